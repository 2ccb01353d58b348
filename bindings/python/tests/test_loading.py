"""How the package finds libconvoy (CONVOY_LIBRARY, then pkg-config, then the dynamic
linker's search) and refuses a library of another ABI version. Each case runs in a fresh
interpreter, since the library is loaded once per process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import convoy
from helpers import REPO


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("CONVOY_LIBRARY", "PKG_CONFIG_PATH")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120
    )


def test_the_installed_package_is_tested():
    if not os.environ.get("CONVOY_TEST_INSTALLED"):
        return  # run directly from the source tree
    package = Path(convoy.__file__).resolve().parent
    assert package != (REPO / "bindings" / "python" / "convoy").resolve()
    assert "site-packages" in package.parts


def test_convoy_library_is_used():
    assert os.environ.get("CONVOY_LIBRARY"), "the runner sets CONVOY_LIBRARY"
    assert convoy.library_path() == os.environ["CONVOY_LIBRARY"]


def test_a_missing_library_is_a_clear_error(tmp_path):
    out = run_python(
        "import convoy\n"
        "try:\n"
        "    convoy.Engine('model.gguf')\n"
        "except convoy.LibraryError as e:\n"
        "    print('LibraryError', e)\n",
        tmp_path,
        CONVOY_LIBRARY=str(tmp_path / "nowhere" / "libconvoy.so"),
    )
    assert out.returncode == 0, out.stderr
    assert "LibraryError" in out.stdout and "nowhere/libconvoy.so" in out.stdout
    assert "CONVOY_LIBRARY" in out.stdout


def test_another_abi_version_is_refused(tmp_path):
    cc = shutil.which("cc")
    assert cc, "a C compiler is needed (scripts/setup.sh installs one)"
    src = tmp_path / "fake.c"
    src.write_text("unsigned convoy_abi_version(void) { return 2; }\n")
    lib = tmp_path / "libconvoy.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    out = run_python(
        "import convoy\n"
        "try:\n"
        "    convoy.version()\n"
        "except convoy.LibraryError as e:\n"
        "    print('LibraryError', e)\n",
        tmp_path,
        CONVOY_LIBRARY=str(lib),
    )
    assert out.returncode == 0, out.stderr
    assert "LibraryError" in out.stdout and "ABI version 2" in out.stdout, out.stdout


def test_pkg_config_finds_an_installed_tree(tmp_path):
    """Without CONVOY_LIBRARY, the libdir of convoy.pc (an installed tree) is used."""
    assert shutil.which("pkg-config"), "pkg-config is needed (scripts/setup.sh installs it)"
    libdir = tmp_path / "prefix" / "lib"
    (libdir / "pkgconfig").mkdir(parents=True)
    os.symlink(os.environ["CONVOY_LIBRARY"], libdir / "libconvoy.so.1")
    (libdir / "pkgconfig" / "convoy.pc").write_text(
        f"prefix={tmp_path / 'prefix'}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n"
        "Name: convoy\nDescription: test\nVersion: 0.2.0\nLibs: -L${libdir} -lconvoy\n"
        "Cflags: -I${includedir}\n"
    )
    out = run_python(
        "import convoy; print(convoy.library_path()); print(convoy.version())",
        tmp_path,
        PKG_CONFIG_PATH=str(libdir / "pkgconfig"),
    )
    assert out.returncode == 0, out.stderr
    path, version = out.stdout.split()
    assert path == str(libdir / "libconvoy.so.1")
    assert version == convoy.version()
