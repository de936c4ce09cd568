"""Split learning of a language model in three parts (SplitLLM's layout, seed 004).

bottom = embeddings + blocks [0, a)        (client)
trunk  = blocks [a, b)                     (server)
top    = blocks [b, L) + final norm + head (client)

``spec.py`` parses and checks the cut ``"a-b"`` and says which part each adapter key belongs to;
``layout.py`` finds the blocks and the input embeddings of a decoder or encoder model; ``defences.py``
holds the defences' math as pure functions (Gaussian noise, d_chi-privacy noise, distance correlation);
``crossings.py`` puts the cuts into ONE shared model (autograd functions at the two cut points that
record and meter every tensor that crosses, and apply the defences); ``parts.py`` is the small API other
code (the attacks) calls: run the bottom part, record what crosses during one client step. See docs/split.md.
"""
