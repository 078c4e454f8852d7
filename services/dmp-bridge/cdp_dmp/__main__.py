"""`python -m cdp_dmp` runs the service."""

from cdp_dmp.main import main

main()
