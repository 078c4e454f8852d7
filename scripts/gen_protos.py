"""Generates the Python protobuf and gRPC modules from protos/ into gen/ (run by `make setup`).

Type stubs (.pyi) for both come from mypy-protobuf's protoc plugins, so that `make typecheck`
checks the services against typed messages, stubs and servicers.
"""

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
    # mypy-protobuf's plugins are installed beside this interpreter (in the venv's bin/).
    bin_dir = Path(sys.executable).parent
    code = protoc.main(
        ["protoc", f"-I{protos}", f"-I{include}",
         f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
         f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
         f"--python_out={out}", f"--mypy_out=quiet:{out}",
         f"--grpc_python_out={out}", f"--mypy_grpc_out=quiet:{out}", *files]
    )
    if code != 0:
        return code
    # Regular packages (not namespace ones) so editable installs map them reliably.
    for directory in [out / "cdp", *(p for p in (out / "cdp").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
