"""The GPU resource estimates are computed from shapes; check them against hand arithmetic."""

from loragen.bench.scaling import lora_step


def test_lora_step_on_qwen05b_matches_hand_counts():
    cost = lora_step("qwen2.5-0.5b", batch=2, seq_len=64)
    # r=8 on all seven modules: r*(in+out) per module, hidden 896, kv 128, mlp 4864, 24 layers
    per_layer = 8 * ((896 + 896) * 2 + (896 + 128) * 2 + (896 + 4864) * 3)
    assert round(cost.trainable_m * 1e6) == 24 * per_layer == 4_399_104
    # frozen matmul weights (24 layers + the tied 151936-row lm_head) cost 2 FLOP per weight and token
    # forward and 2 more for the input gradients; attention and LoRA add a few percent
    matmul = 24 * (896 * 896 * 2 + 896 * 128 * 2 + 896 * 4864 * 3) + 896 * 151936
    tokens = 2 * 64
    assert 4 * matmul * tokens <= cost.tflop * 1e12 <= 1.1 * 4 * matmul * tokens
    assert abs(cost.weights_gb - 2 * 494_032_768 / 1e9) < 0.02  # bf16 weights incl. embeddings
    assert cost.activations_gb > 0 and cost.memory_gb > cost.weights_gb
