"""`python -m cdp_segmentation` runs the service."""

from cdp_common.service import run
from cdp_segmentation.main import DEFINITION

run(DEFINITION)
