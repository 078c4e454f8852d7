"""`python -m cdp_segmentation` runs the service."""

from cdp_segmentation.main import main

main()
