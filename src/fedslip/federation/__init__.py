"""The federation: one round protocol (`protocol.py`) over two transports, in-process and Flower (`flower/`)."""
