"""tumorseg_dist: distributed training toolkit for 2D tumour segmentation."""
__version__ = "0.1.0"
