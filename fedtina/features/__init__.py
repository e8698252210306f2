"""Features: what turns images and names into vectors. The generic backbone (a ResNet-20 trained on the seen classes'
backbone images) and its frozen feature bank; the text encoders that embed class names and sentences."""
