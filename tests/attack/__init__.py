"""The attack matrix, shared by the integration tier and the kernel tier (with limits on)."""
