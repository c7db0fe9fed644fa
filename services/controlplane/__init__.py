"""The control plane: clusters, deployments, placement, actuators, drain, cordon, admin RPCs."""
