"""Backbones (open_clip, timm, torchvision, custom modules) and the engines the methods call:
the text head, the linear-probe solver, LP-CLIP's self-training, the fine-tuning loop, WiSE-FT's
interpolation and temperature fitting. The methods themselves are declared in
:mod:`robench.methods`.
"""
