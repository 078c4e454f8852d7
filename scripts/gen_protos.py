"""Generates the Python protobuf and gRPC modules from protos/ into gen/ (run by `make setup`)."""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    protos = ROOT / "protos"
    out = ROOT / "gen"
    out.mkdir(exist_ok=True)
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(
        ["protoc", f"-I{protos}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
         f"--grpc_python_out={out}", *files]
    )
    if code != 0:
        return code
    # Regular packages (not namespace ones) so editable installs map them reliably.
    for directory in [out / "cdp", *(p for p in (out / "cdp").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
