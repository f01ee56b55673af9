"""megatron-core modules and layer specs (In-Place TTT MLP, CPU-capable norms and attention)."""
