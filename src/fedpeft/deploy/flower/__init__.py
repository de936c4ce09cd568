"""fedpeft on Flower: a ServerApp running the engine's round loop over a ``FlowerTransport`` and a ClientApp
running the same ``ClientRunner`` as the in-process engine. Needs ``pip install 'fedpeft[flower]'``.

Modules: ``serde`` (ClientPlan / ClientUpdate <-> Flower records), ``transport`` (FlowerTransport),
``server_app`` / ``client_app`` (the Flower components), ``node`` (the node's build and train handler, run
by the ClientApp or its warm ``worker``), ``settings`` (run config and node config),
``app`` (the app folder for ``flwr run``), ``local`` (a SuperLink + SuperNodes on 127.0.0.1, ``flwr`` CLI
helpers), ``store`` (the client store on a SuperNode). See docs/deploy.md.
"""
