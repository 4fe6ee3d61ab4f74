"""The Flower transport: ServerApp/ClientApp over the shared round protocol."""
