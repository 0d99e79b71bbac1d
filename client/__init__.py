"""FedContrast client package."""
