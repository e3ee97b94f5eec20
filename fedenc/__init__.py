"""fedenc: federated training of shared session-recommendation encoders."""

__version__ = "0.1.0"
