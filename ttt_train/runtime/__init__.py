"""Device and distributed set-up: CPU compatibility for megatron-core, process groups, local ranks."""
