"""`python -m cdp_activation` runs the service."""

from cdp_activation.main import main

main()
