"""Tests of evpl.rpc2.xdrgen: the .x compiler and the code it generates."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evpl.rpc2.xdr import XdrError
from evpl.rpc2.xdrgen import XdrgenError, compile_x, load_x, main

DATA = Path(__file__).parent / "data"
RPCSVC = "/usr/include/rpcsvc"
RPCSVC_FILES = sorted(glob.glob(os.path.join(RPCSVC, "*.x")))
needs_rpcsvc = pytest.mark.skipif(
    not os.path.isfile(os.path.join(RPCSVC, "nfs_prot.x")),
    reason="rpcsvc .x files missing (apt-get install rpcsvc-proto libtirpc-dev)")


@pytest.fixture(scope="module")
def nfs3() -> types.ModuleType:
    return load_x(DATA / "nfs3.x")


def rpcsvc(name: str) -> types.ModuleType:
    return load_x(os.path.join(RPCSVC, name))


def round_trip(mod: types.ModuleType, type_name: str, value: Any) -> bytes:
    """Encode, decode, compare; also check every truncation of the encoding fails."""
    data = getattr(mod, f"encode_{type_name}")(value)
    decode: Callable[[Any], Any] = getattr(mod, f"decode_{type_name}")
    assert decode(data) == value
    assert decode(bytearray(data)) == value
    if len(data) < 2000:
        for cut in range(len(data)):
            with pytest.raises(XdrError):
                decode(data[:cut])
    return data


# -- every .x file Debian installs ------------------------------------------

@needs_rpcsvc
@pytest.mark.parametrize("path", RPCSVC_FILES, ids=os.path.basename)
def test_compiles_rpcsvc_file(path: str) -> None:
    if os.path.basename(path) == "nis_callback.x":
        # uses nis_object and nis_error without defining them (its C header includes nis.h)
        with pytest.raises(XdrgenError, match="unknown type 'nis_object'"):
            load_x(path)
        load_x(os.path.join(RPCSVC, "nis.x"), name="evpl_test_nis", register=True)
        try:
            mod = load_x(path, imports=["evpl_test_nis"])
        finally:
            del sys.modules["evpl_test_nis"]
        assert mod.cback_data([]) == mod.decode_cback_data(mod.encode_cback_data(
            mod.cback_data([])))
        return
    mod = load_x(path)
    assert any(name.startswith("pack_") for name in vars(mod))


def test_nfs3_x_compiles_with_all_procedures(nfs3: types.ModuleType) -> None:
    assert nfs3.NFS_PROGRAM == 100003 and nfs3.NFS_V3 == 3
    assert sorted(nfs3.NFS_V3Server.PROCEDURES) == list(range(22))
    assert sorted(nfs3.MOUNT_V3Server.PROCEDURES) == list(range(6))
    assert nfs3.NFSPROC3_COMMIT == 21 and nfs3.MOUNTPROC3_EXPORT == 5


# -- round trips through real definitions ---------------------------------------

def fattr(nfs3: types.ModuleType, fileid: int = 7) -> Any:
    t = nfs3.nfstime3(1_700_000_000, 5)
    return nfs3.fattr3(nfs3.ftype3.NF3REG, 0o644, 1, 1000, 100, 2**40, 4096,
                       nfs3.specdata3(0, 0), 0xFEEDFACE, fileid, t, t, t)


def test_nfs3_getattr(nfs3: types.ModuleType) -> None:
    ok = nfs3.GETATTR3res(nfs3.NFS3_OK, nfs3.GETATTR3resok(fattr(nfs3)))
    data = round_trip(nfs3, "GETATTR3res", ok)
    assert len(data) == 4 + 84
    assert nfs3.decode_GETATTR3res(data).resok.obj_attributes.size == 2**40
    err = nfs3.GETATTR3res(nfs3.NFS3ERR_STALE)
    assert round_trip(nfs3, "GETATTR3res", err) == b"\0\0\0\x46"
    with pytest.raises(AttributeError):
        _ = err.resok
    args = nfs3.GETATTR3args(nfs3.nfs_fh3(b"\1" * 64))
    round_trip(nfs3, "GETATTR3args", args)
    with pytest.raises(XdrError):  # nfs_fh3 is opaque<64>
        nfs3.encode_GETATTR3args(nfs3.GETATTR3args(nfs3.nfs_fh3(b"\1" * 65)))


def test_nfs3_read(nfs3: types.ModuleType) -> None:
    payload = bytes(range(256)) * 4 + b"xyz"
    res = nfs3.READ3res(nfs3.NFS3_OK, nfs3.READ3resok(
        nfs3.post_op_attr(True, fattr(nfs3)), len(payload), True, payload))
    data = round_trip(nfs3, "READ3res", res)
    assert data.endswith(b"xyz\0")
    fail = nfs3.READ3res(nfs3.NFS3ERR_IO, nfs3.READ3resfail(nfs3.post_op_attr(False)))
    round_trip(nfs3, "READ3res", fail)
    assert fail.resfail.file_attributes.value is None


def test_nfs3_readdir_long_list_is_iterative(nfs3: types.ModuleType) -> None:
    n = 20_000  # far beyond the recursion limit if the list were decoded recursively
    entries = [nfs3.entry3(i, f"file-{i}".encode(), i + 1) for i in range(n)]
    res = nfs3.READDIR3res(nfs3.NFS3_OK, nfs3.READDIR3resok(
        nfs3.post_op_attr(False), b"verf0001", nfs3.dirlist3(entries, True)))
    data = nfs3.encode_READDIR3res(res)
    back = nfs3.decode_READDIR3res(data)
    assert back == res
    assert back.resok.reply.entries[-1].name == b"file-19999"
    empty = nfs3.READDIR3res(nfs3.NFS3_OK, nfs3.READDIR3resok(
        nfs3.post_op_attr(False), b"verf0001", nfs3.dirlist3([], False)))
    round_trip(nfs3, "READDIR3res", empty)
    # a hostile list whose last "more entries" flag is 2, or that stops early
    with pytest.raises(XdrError):
        nfs3.decode_READDIR3res(data[:-8] + b"\0\0\0\2" + data[-4:])


def test_nfs3_readdirplus_and_unions(nfs3: types.ModuleType) -> None:
    e = nfs3.entryplus3(1, b"a", 2, nfs3.post_op_attr(True, fattr(nfs3)),
                        nfs3.post_op_fh3(True, nfs3.nfs_fh3(b"fh")))
    res = nfs3.READDIRPLUS3res(nfs3.NFS3_OK, nfs3.READDIRPLUS3resok(
        nfs3.post_op_attr(False), bytes(8), nfs3.dirlistplus3([e, e], True)))
    round_trip(nfs3, "READDIRPLUS3res", res)
    how = nfs3.createhow3(nfs3.GUARDED, nfs3.sattr3(
        nfs3.set_mode3(True, 0o755), nfs3.set_uid3(False), nfs3.set_gid3(False),
        nfs3.set_size3(True, 0), nfs3.set_atime(nfs3.SET_TO_SERVER_TIME),
        nfs3.set_mtime(nfs3.SET_TO_CLIENT_TIME, nfs3.nfstime3(1, 2))))
    args = nfs3.CREATE3args(nfs3.diropargs3(nfs3.nfs_fh3(b"d"), b"new"), how)
    round_trip(nfs3, "CREATE3args", args)
    assert how.obj_attributes.mode.mode == 0o755
    excl = nfs3.createhow3(nfs3.EXCLUSIVE, b"12345678")
    round_trip(nfs3, "createhow3", excl)
    mknod = nfs3.mknoddata3(nfs3.NF3REG)  # default arm: void
    round_trip(nfs3, "mknoddata3", mknod)


def test_union_without_default_rejects_unknown_discriminant(nfs3: types.ModuleType) -> None:
    with pytest.raises(XdrError, match=r"discriminant|createmode3"):
        nfs3.decode_createhow3(b"\0\0\0\x09")
    with pytest.raises(XdrError):
        nfs3.encode_createhow3(nfs3.createhow3(9, None))


def test_unknown_enum_value_rejected(nfs3: types.ModuleType) -> None:
    with pytest.raises(XdrError, match="nfsstat3"):
        nfs3.decode_GETATTR3res(b"\0\0\0\x03")
    with pytest.raises(XdrError, match="ftype3"):
        bad = fattr(nfs3)
        bad.type = 99
        nfs3.encode_fattr3(bad)


def test_unknown_enum_discriminant_rejected_even_with_a_default_arm() -> None:
    """rpcgen's C would take the default arm (docs/rpc2.md, differences)."""
    mod = load_x("enum color { RED = 0, GREEN = 1 };\n"
                 "union u switch (color c) { case RED: int r; default: void; };")
    assert mod.decode_u(b"\0\0\0\1") == mod.u(mod.GREEN)  # known, default arm
    with pytest.raises(XdrError, match="invalid color value 7"):
        mod.decode_u(b"\0\0\0\7")


def test_mount_v3(nfs3: types.ModuleType) -> None:
    ok = nfs3.mountres3(nfs3.MNT3_OK, nfs3.mountres3_ok(b"\x01" * 32, [0, 1]))
    round_trip(nfs3, "mountres3", ok)
    exports = [nfs3.exportnode(b"/export", [nfs3.groupnode(b"*"), nfs3.groupnode(b"lan")]),
               nfs3.exportnode(b"/srv", [])]
    round_trip(nfs3, "exports", exports)
    round_trip(nfs3, "exports", [])


@needs_rpcsvc
def test_rpcsvc_round_trips() -> None:
    nfs = rpcsvc("nfs_prot.x")
    rr = nfs.readdirres(nfs.NFS_OK, nfs.dirlist(
        [nfs.entry(i, b"n%d" % i, b"\0\0\0\1") for i in range(5)], True))
    round_trip(nfs, "readdirres", rr)
    mount = rpcsvc("mount.x")
    round_trip(mount, "fhstatus", mount.fhstatus(0, b"\7" * 32))
    round_trip(mount, "fhstatus", mount.fhstatus(13))
    round_trip(mount, "mountlist", [mount.mountbody(b"host", b"/x")] * 3)
    nlm = rpcsvc("nlm_prot.x")
    lock = nlm.nlm_lock(b"client", b"fh", b"owner", 42, 0, 100)
    round_trip(nlm, "nlm_lockargs", nlm.nlm_lockargs(b"cookie", True, False, lock, True, 7))
    with pytest.raises(XdrError):  # caller_name is string<LM_MAXSTRLEN> (a %#define)
        nlm.encode_nlm_lock(nlm.nlm_lock(b"x" * 1025, b"", b"", 0, 0, 0))
    rq = rpcsvc("rquota.x")
    quota = rq.rquota(1024, True, 1, 2, 3, 4, 5, 6, 7, 8)
    round_trip(rq, "getquota_rslt", rq.getquota_rslt(rq.Q_OK, quota))
    round_trip(rq, "getquota_rslt", rq.getquota_rslt(rq.Q_EPERM))
    yp = rpcsvc("yp.x")
    kv = yp.ypresp_key_val(yp.YP_TRUE, b"value", b"key")
    round_trip(yp, "ypresp_key_val", kv)
    round_trip(yp, "ypmaplist", [yp.ypmaplist(b"passwd.byname"), yp.ypmaplist(b"hosts")])
    nis = rpcsvc("nis.x")
    obj = nis.nis_object(nis.nis_oid(1, 2), b"name.", b"owner.", b"group.", b"dom.", 0, 60,
                         nis.objdata(nis.NIS_GROUP_OBJ, nis.group_obj(0, [b"a.", b"b."])))
    res = nis.nis_result(nis.NIS_SUCCESS, [obj], b"cookie", 1, 2, 3, 4)
    round_trip(nis, "nis_result", res)
    key = rpcsvc("key_prot.x")
    assert key.HEXMODULUS == "d4a0ba0250b6fd2ec626e7efd637df76c716e22d0944b88b"
    rstat = rpcsvc("rstat.x")
    st_ = rstat.statstime([1, 2, 3, 4], [0] * 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, [1, 2, 3],
                          rstat.rstat_timeval(1, 2), rstat.rstat_timeval(3, 4), 11)
    round_trip(rstat, "statstime", st_)
    st_.cp_time = [1]  # cp_time is int[CPUSTATES]
    with pytest.raises(XdrError, match="exactly 4"):
        rstat.encode_statstime(st_)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_garbage_decodes_raise_only_xdr_error(data: bytes) -> None:
    mod = _nfs3_cached()
    for name in ("READDIR3res", "READDIRPLUS3res", "CREATE3args", "READ3res", "exports",
                 "SETATTR3args", "mountres3"):
        try:
            getattr(mod, f"decode_{name}")(data)
        except XdrError:
            pass


_CACHE: dict[str, types.ModuleType] = {}


def _nfs3_cached() -> types.ModuleType:
    if "nfs3" not in _CACHE:
        _CACHE["nfs3"] = load_x(DATA / "nfs3.x")
    return _CACHE["nfs3"]


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=30)), max_size=50),
       st.booleans())
def test_dirlist_round_trip_property(items: list[tuple[int, bytes]], eof: bool) -> None:
    mod = _nfs3_cached()
    dl = mod.dirlist3([mod.entry3(fid, name, fid // 2) for fid, name in items], eof)
    assert mod.decode_dirlist3(mod.encode_dirlist3(dl)) == dl


# -- stubs and skeletons -----------------------------------------------------------

class RecordingCaller:
    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.calls: list[tuple[int, int, int, bytes]] = []

    def call(self, prog: int, vers: int, proc: int, args: bytes,
             decode: Callable[[Any], Any]) -> Any:
        self.calls.append((prog, vers, proc, args))
        return decode(self.reply)


def test_client_stub_and_server_dispatch(nfs3: types.ModuleType) -> None:
    class Server(nfs3.NFS_V3Server):  # type: ignore[name-defined,misc]
        def NFSPROC3_GETATTR(self, arg: Any) -> Any:
            assert arg.object.data == b"fh"
            return nfs3.GETATTR3res(nfs3.NFS3ERR_ACCES)

    server = Server()
    reply = bytearray()
    caller = RecordingCaller(b"")
    client = nfs3.NFS_V3Client(caller)
    assert client.NFSPROC3_NULL() is None
    client.caller.reply = b"\0\0\0\x0d"
    res = client.NFSPROC3_GETATTR(nfs3.GETATTR3args(nfs3.nfs_fh3(b"fh")))
    assert res == nfs3.GETATTR3res(nfs3.NFS3ERR_ACCES)
    prog, vers, proc, args = caller.calls[-1]
    assert (prog, vers, proc) == (100003, 3, 1)
    entry = Server.PROCEDURES[proc]
    decoded, off = entry.unpack_args(memoryview(args), 0)
    assert off == len(args)
    entry.pack_result(reply, getattr(server, entry.name)(*decoded))
    assert bytes(reply) == b"\0\0\0\x0d"
    with pytest.raises(NotImplementedError):
        server.NFSPROC3_READ(None)
    null = Server.PROCEDURES[0]
    assert null.unpack_args(memoryview(b""), 0) == ((), 0)


# -- language features and errors ---------------------------------------------------

FEATURES = """
%#include <stdio.h>
% this line is C and ignored { ; <
/* block comment with # and % inside
#error not a directive here
*/
#define SIZE 3  // a macro
#ifdef NOT_DEFINED
struct broken {
#else
const OCTAL = 010;
#endif
#if defined(RPC_HDR) && SIZE > 2
const FROM_IF = 1;
#endif
const HEX = 0x10;
const NEG = -5;
const STR = "text";
enum auto { A, B, C = 10, D };
typedef struct { int x; unsigned y; } point;
typedef enum { LOW = 1, HIGH = 2 } level;
struct shape {
    point corners[SIZE];
    level lvl;
    struct { hyper h; float f; double d; } inner;
    opaque tag[5];
    string label<HEX>;
    int ints<>;
    bool flags<2>;
    unsigned hyper big;
    point *maybe;
    u_int lib_type;
};
union choice switch (int kind) {
case 1: case 2:
    int number;
case NEG:
    void;
default:
    shape s;
};
program DEMO {
    version DEMO_V1 {
        void PING(void) = 0;
        int ADD(int, int) = 1;
        string ECHO(string) = 2;
        choice PICK(unsigned int) = 3;
    } = 1;
} = 0x20000001;
"""


@pytest.fixture(scope="module")
def demo() -> types.ModuleType:
    return load_x(FEATURES)


def test_language_features(demo: types.ModuleType) -> None:
    assert (demo.OCTAL, demo.FROM_IF, demo.HEX, demo.NEG, demo.STR) == (8, 1, 16, -5, "text")
    assert [int(m) for m in demo.auto] == [0, 1, 10, 11] and demo.D == 11
    assert not hasattr(demo, "broken")
    p = demo.point(-1, 2)
    shape = demo.shape([p, p, p], demo.HIGH, demo.shape_inner(2**40, 0.5, 0.25), b"12345",
                       "label", [1, -2, 3], [True, False], 2**64 - 1, None, 9)
    data = demo.encode_shape(shape)
    back = demo.decode_shape(data)
    assert back.label == b"label" and back.maybe is None and back.flags == [True, False]
    shape.label = b"label"
    assert back == shape
    shape.maybe = p
    round_trip(demo, "shape", shape)
    for value in (demo.choice(1, 5), demo.choice(2, -5), demo.choice(-5), demo.choice(7, shape)):
        round_trip(demo, "choice", value)
    assert demo.choice(2, 5).number == 5
    with pytest.raises(AttributeError):
        _ = demo.choice(2, 5).s
    assert demo.choice(7, shape).s is shape


@pytest.mark.parametrize("change,error", [
    (lambda s: setattr(s, "label", b"x" * 17), "bound"),
    (lambda s: setattr(s, "corners", []), "exactly 3"),
    (lambda s: setattr(s, "tag", b"1234"), "exactly 5"),
    (lambda s: setattr(s, "flags", [True, False, True]), "bound"),
    (lambda s: setattr(s, "lib_type", -1), "encode"),
    (lambda s: setattr(s, "lvl", 7), "level"),
])
def test_encode_checks(demo: types.ModuleType, change: Callable[[Any], None],
                       error: str) -> None:
    p = demo.point(0, 0)
    shape = demo.shape([p, p, p], demo.LOW, demo.shape_inner(0, 0.0, 0.0), b"12345", b"",
                       [], [], 0, None, 0)
    change(shape)
    with pytest.raises(XdrError, match=error):
        demo.encode_shape(shape)


def test_multi_argument_procedures(demo: types.ModuleType) -> None:
    caller = RecordingCaller(b"\0\0\0\x05")
    assert demo.DEMO_V1Client(caller).ADD(2, 3) == 5
    assert caller.calls[-1][3] == b"\0\0\0\2\0\0\0\3"
    proc = demo.DEMO_V1Server.PROCEDURES[1]
    assert proc.unpack_args(memoryview(caller.calls[-1][3]), 0) == ((2, 3), 8)
    caller.reply = b"\0\0\0\2hi\0\0"
    assert demo.DEMO_V1Client(caller).ECHO("yo") == b"hi"
    assert demo.DEMO == 0x20000001


def test_anonymous_codec_errors_name_the_type() -> None:
    """A codec of an unnamed argument/result type is shared by arguments and
    results, so its errors name the XDR type, never "procedure argument"."""
    mod = load_x("""
        program P { version V {
            int ADD(int) = 1;
            unsigned hyper BIG(string) = 2;
        } = 1; } = 0x20000002;""")
    add, big = mod.VServer.PROCEDURES[1], mod.VServer.PROCEDURES[2]
    for proc, bad, spelled in ((add, 2**31, "int"), (big, -1, "unsigned hyper")):
        with pytest.raises(XdrError, match=rf"^cannot encode {spelled}: ") as exc:
            proc.pack_result(bytearray(), bad)  # what the server does with a result
        assert "argument" not in str(exc.value)
    with pytest.raises(XdrError, match=r"^cannot encode int: "):
        mod.VClient(RecordingCaller(b"")).ADD(-(2**31) - 1)  # an argument
    with pytest.raises(XdrError, match=r"^cannot decode int: "):
        add.unpack_args(memoryview(b"\0\0"), 0)
    with pytest.raises(XdrError, match=r"^cannot decode unsigned hyper: "):
        mod.VClient(RecordingCaller(b"\0\0\0\0")).BIG(b"x")


def test_opaque_views_option() -> None:
    mod = load_x("struct blob { opaque data<>; opaque fixed[6]; };", opaque_views=True)
    raw = bytearray(mod.encode_blob(mod.blob(b"abc", b"123456")))
    value = mod.decode_blob(raw)
    assert isinstance(value.data, memoryview) and value.data == b"abc"
    raw[4] = ord("z")
    assert value.data == b"zbc"  # a view of the input, not a copy


def test_recursive_tree_without_flattening() -> None:
    mod = load_x("struct node { int v; node *left; node *right; };")
    tree = mod.node(1, mod.node(2, None, None), mod.node(3, mod.node(4, None, None), None))
    round_trip(mod, "node", tree)


def test_linked_struct_used_directly_is_a_nonempty_list() -> None:
    mod = load_x("struct item { int v; item *next; }; struct holder { item first; };")
    round_trip(mod, "holder", mod.holder([mod.item(1), mod.item(2)]))
    with pytest.raises(XdrError):
        mod.encode_holder(mod.holder([]))


def test_python_keywords_are_renamed() -> None:
    mod = load_x("struct class { int from; int lambda; }; enum e { None = 1, value = 2 };")
    v = mod.class_(1, 2)
    assert v.from_ == 1 and v.lambda_ == 2
    assert mod.e.None_ == 1 and mod.e.value_ == 2


def test_include_and_defines(tmp_path: Path) -> None:
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "common.x").write_text("const COMMON = 4;\n")
    main_x = tmp_path / "main.x"
    main_x.write_text('#include "common.x"\n#ifdef BIG\nconst N = 100;\n#else\n'
                      "const N = COMMON;\n#endif\ntypedef int arr[N];\n")
    mod = load_x(main_x, include_dirs=[str(tmp_path / "inc")])
    assert mod.N == 4
    mod = load_x(main_x, include_dirs=[str(tmp_path / "inc")], defines={"BIG": "1"})
    assert mod.N == 100


@pytest.mark.parametrize("source,message", [
    ("struct a { int x; }\n", r"<source>:2: expected ';'"),
    ("struct a { foo x; };", r"<source>:1: unknown type 'foo'"),
    ("const A = 1;\nconst A = 2;", r"<source>:2: 'A' already defined at <source>:1"),
    ("typedef int x<B>;", "unknown constant 'B'"),
    ("struct s { s inner; };", "contains itself"),
    ("union u switch (string s<>) { case 1: int x; };", "discriminant must be"),
    ("struct a { int x; string; };", "expected an identifier"),
    ("union u switch (hyper h) { case 1: int x; };", "discriminant must be"),
    ("union u switch (int d) { case 1: int x; case 1: int y; };", "duplicate case"),
    ("struct s { quadruple q; };", "quadruple"),
    ("#if 1\nconst A = 1;\n", "unterminated #if"),
    ("#error stop here", "#error stop here"),
    ("const A = B;\nconst B = A;", "in terms of itself"),
    ("struct s { int x; } $", "unexpected character"),
    ("program P { version V { void F(void) = 1; int G(void) = 1; } = 1; } = 5;",
     "procedure number 1"),
    ("struct a { opaque x[-1]; };", "out of range"),
])
def test_errors_have_locations(source: str, message: str) -> None:
    with pytest.raises(XdrgenError, match=message):
        compile_x(source)


def test_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.x"
    bad.write_text("const OK = 1;\n\nstruct {\n")
    with pytest.raises(XdrgenError, match=r"bad\.x:3: "):
        load_x(bad)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nfs3_xdr.py"
    assert main([str(DATA / "nfs3.x"), "-o", str(out)]) == 0
    namespace: dict[str, Any] = {}
    exec(compile(out.read_text(), str(out), "exec"), namespace)  # the output is valid Python
    assert namespace["NFS_PROGRAM"] == 100003
    assert main([str(DATA / "nfs3.x")]) == 0
    assert "class NFS_V3Client" in capsys.readouterr().out
    bad = tmp_path / "bad.x"
    bad.write_text("struct x {")
    assert main([str(bad)]) == 1
    assert "bad.x:1:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "evpl xdrgen" in capsys.readouterr().out


def test_python_dash_m_prints_no_warning(tmp_path: Path) -> None:
    """``python -m evpl.rpc2.xdrgen`` runs without runpy's RuntimeWarning about the
    module being in sys.modules already (it used to be imported twice)."""
    out = tmp_path / "calc_xdr.py"
    cmd = [sys.executable, "-W", "always", "-m", "evpl.rpc2.xdrgen",
           str(DATA / "calc.x"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "CALC_PROG = 536871203" in out.read_text()
    # errors still go to stderr with status 1
    res = subprocess.run([*cmd[:-3], str(tmp_path / "missing.x")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("evpl xdrgen: ") and "Warning" not in res.stderr


def test_generated_source_is_straight_line(nfs3: types.ModuleType) -> None:
    source = compile_x((DATA / "nfs3.x").read_text(), "nfs3.x")
    compile(source, "nfs3_xdr.py", "exec")
    assert "def unpack_fattr3" in source and "_Struct('>iIIIIQQIIQQIIIIII')" in source
