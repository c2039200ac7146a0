"""zoomvlm: learned zoom policies that make vision-language models look where it matters.

A *zoom policy* reads an image and a question and picks the high-resolution regions that matter; the
*target* model answers from a cheap global view plus those crops. See the README for the map of modules.
Heavy submodules (targets, policies) are imported on use, so ``import zoomvlm`` stays light.
"""

__version__ = "0.1.0"
