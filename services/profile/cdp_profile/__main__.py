"""`python -m cdp_profile` runs the service."""

from cdp_common.service import run
from cdp_profile.main import DEFINITION

# The guard matters here: the scoring job's child process (spawned) imports this module too.
if __name__ == "__main__":
    run(DEFINITION)
