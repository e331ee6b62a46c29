"""Vision-language backbones (registered by name: timm_lm, hf_vlm)."""
