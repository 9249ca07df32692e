"""Generation through the split: the device decoder (onnxruntime, its own key/value cache) feeding the
server blocks (torch, their cache) and the model's LM head; an unsplit reference; GSM8K evaluation."""
