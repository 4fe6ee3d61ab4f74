"""FedSLIP: federated, personalized, parameter-efficient fine-tuning of transformer classifiers."""

__version__ = "0.1.0"
