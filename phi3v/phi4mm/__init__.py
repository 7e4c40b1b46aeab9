"""Phi-4-multimodal (transformers-native Phi4MultimodalForCausalLM): what differs from Phi-3.5-vision."""
