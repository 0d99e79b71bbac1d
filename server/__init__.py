"""FedContrast server package."""
