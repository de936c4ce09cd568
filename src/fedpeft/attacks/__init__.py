"""Data-reconstruction attacks on what crosses the wire in split and plain federated fine-tuning, and
their scores.

- ``metrics``: ROUGE-L F, METEOR (exact-match stage) and token accuracy of a reconstruction.
- ``cut``: cut-layer activations of a plain Hugging Face model (hidden state after block ``a``) and the
  bottom part as a differentiable function of input embeddings.
- ``eia``: embedding inversion (optimise input embeddings to reproduce the activations at the cut).
- ``gradient_matching``: DLG / TAG on the gradient crossing the top cut and on a FedIT LoRA update.
- ``sip``: a learned inversion model trained on auxiliary data; ``bisr``: SIP refined against both the
  forward activations and the backward gradients.
- ``recorded``: the attacks on a real split run's recorded crossings (``fedpeft attack --run``), written
  to ``RUN_DIR/privacy/attack.json``; ``report``: the run report's privacy section read from it.
- ``defences``: minimal stand-ins (activation / gradient Gaussian noise) used to check that attacks drop.

Every attack takes what the attacker observes plus the model and returns recovered token ids, so the
split engine can call it on the tensors it meters.
"""
