"""FedContrast simulations package."""
