"""`python -m cdp_activation` runs the service."""

from cdp_common.service import run
from cdp_activation.main import DEFINITION

run(DEFINITION)
