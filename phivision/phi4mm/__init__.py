"""Phi-4-multimodal: image processor, processor and tiny checkpoint, beside Phi-3.5-vision's.

The model itself is transformers' own `Phi4MultimodalForCausalLM`; what lives here is the input side that
must run without torchvision (see `image_processing`) and the checkpoint builder for tests.
"""
