"""fedenc's Flower apps: ``nodes.master:app`` (ServerApp) and ``nodes.child:app`` (ClientApp)."""
