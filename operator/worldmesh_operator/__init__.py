"""worldmesh's control plane. For now: the command line; the reconciler, runtimes and kopf
handlers come with the control-plane and Kubernetes work."""
