"""Compile XDR / RPC language (``.x``) files into Python modules.

The input language is RFC 4506 section 6 plus rpcgen's ``program`` /
``version`` / procedure definitions.  Lines starting with ``%`` are ignored
(they are C passed through by rpcgen); ``#if``/``#ifdef``/``#ifndef``/
``#else``/``#endif``/``#define``/``#include`` are handled by a small
preprocessor (``RPC_HDR`` is defined by default, as in the pass that makes
rpcgen's header, which is where the type definitions live).

The generated module contains, for a definition named ``T``:

* ``const``: a module constant ``T = value``; enum members also become
  module constants, like in C.
* ``enum``: an ``IntEnum`` class ``T``; decoding an unknown value is an error.
* ``struct``: a slotted dataclass ``T`` whose fields follow the declaration.
* ``union``: a slotted dataclass ``T(<discriminant>, value=None)``: the
  discriminant under its declared name, the selected arm's value in
  ``value``; each (uniquely named) arm is also a read-only property that
  raises ``AttributeError`` unless the discriminant selects it.
* ``typedef``: a module alias ``T`` of the Python type of its values.
* For every type: ``pack_T(buf: bytearray, value)`` (append),
  ``unpack_T(mv: memoryview, off) -> (value, new_off)``, ``encode_T(value)
  -> bytes`` and ``decode_T(buffer) -> value`` (the buffer must hold exactly
  one value).
* ``program``/``version``: constants for program, version and procedure
  numbers; per version a client stub class ``<VERSION>Client(caller)``
  whose methods call ``caller.call(prog, vers, proc, args_bytes, decode)``
  (see :class:`evpl.rpc2.xdr.Caller`), and a server skeleton
  ``<VERSION>Server`` with one method per procedure (raising
  ``NotImplementedError``) and ``PROCEDURES``, a dict from procedure number
  to :class:`evpl.rpc2.xdr.Procedure` (args decoder, method name, result
  encoder).

Values: see :mod:`evpl.rpc2.xdr`; arrays are lists, optional data is
``None`` or the value.  A struct ``S`` whose last field is an optional ``S``
(the linked-list idiom ``entry *nextentry``) is flattened: ``S`` has no link
field, and an optional ``S`` (however it is spelled, e.g. through a typedef)
is a ``list[S]`` (empty for NULL); a directly embedded ``S`` is a non-empty
``list[S]``.  Lists are encoded and decoded iteratively, so directories with
millions of entries do not hit the recursion limit.

Generated code is straight-line: runs of fixed-size fields (integers,
enums, booleans, fixed opaque, nested fixed-size structs) are packed or
unpacked with one precompiled ``struct.Struct`` call.
"""

from __future__ import annotations

import argparse
import keyword
import os
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from evpl.errors import ConfigError

__all__ = ["XdrgenError", "compile_x", "load_x", "main"]


class XdrgenError(ConfigError):
    """An ``.x`` file could not be compiled; the message starts with ``file:line:``."""


# --------------------------------------------------------------------------
# Abstract syntax

@dataclass(frozen=True)
class Loc:
    """A position in an input file, for error messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


Value = int | str  # a literal, the name of a constant, or a C expression


@dataclass(frozen=True)
class StrLit:
    """A string constant (``const NAME = "text";``), kept as its C literal."""

    text: str


@dataclass(frozen=True)
class Prim:
    """A built-in scalar: int, uint, hyper, uhyper, float, double, bool, quadruple."""

    kind: str


@dataclass(frozen=True)
class Ref:
    """A reference to a named enum, struct, union or typedef."""

    name: str


@dataclass(frozen=True)
class FOpaque:
    """``opaque x[size]``."""

    size: Value


@dataclass(frozen=True)
class VOpaque:
    """``opaque x<bound>``."""

    bound: Value


@dataclass(frozen=True)
class String:
    """``string x<bound>``."""

    bound: Value


@dataclass(frozen=True)
class FArray:
    """``T x[size]``."""

    elem: TypeExpr
    size: Value


@dataclass(frozen=True)
class VArray:
    """``T x<bound>``."""

    elem: TypeExpr
    bound: Value


@dataclass(frozen=True)
class Opt:
    """``T *x``."""

    elem: TypeExpr


@dataclass(frozen=True)
class Void:
    """``void``."""


TypeExpr = Prim | Ref | FOpaque | VOpaque | String | FArray | VArray | Opt | Void


@dataclass
class Decl:
    """A named (or void) declaration inside a struct, union or typedef."""

    name: str | None
    type: TypeExpr
    loc: Loc


@dataclass
class ConstDef:
    name: str
    value: Value | StrLit
    loc: Loc


@dataclass
class TypedefDef:
    name: str
    type: TypeExpr
    loc: Loc


@dataclass
class EnumDef:
    name: str
    members: list[tuple[str, Value]]
    loc: Loc


@dataclass
class StructDef:
    name: str
    fields: list[Decl]
    loc: Loc


@dataclass
class UnionDef:
    name: str
    disc: Decl
    arms: list[tuple[list[Value], Decl]]
    default: Decl | None
    loc: Loc


@dataclass
class ProcDef:
    name: str
    number: Value
    result: TypeExpr
    args: list[TypeExpr]
    loc: Loc


@dataclass
class VersionDef:
    name: str
    number: Value
    procs: list[ProcDef]
    loc: Loc


@dataclass
class ProgramDef:
    name: str
    number: Value
    versions: list[VersionDef]
    loc: Loc


Definition = ConstDef | TypedefDef | EnumDef | StructDef | UnionDef | ProgramDef

UNBOUNDED = 0xFFFFFFFF
MAX_NETOBJ_SZ = 1024

# Type names rpcgen maps to XDR library routines; used when the file does not
# define them itself.
_BUILTIN_TYPES: dict[str, TypeExpr] = {
    **dict.fromkeys(("int32_t", "int16_t", "int8_t", "enum_t"), Prim("int")),
    **dict.fromkeys(("u_int", "u_long", "u_short", "u_char", "uint32_t", "u_int32_t",
                     "uint16_t", "u_int16_t", "uint8_t", "u_int8_t"), Prim("uint")),
    **dict.fromkeys(("int64_t", "quad_t", "longlong_t"), Prim("hyper")),
    **dict.fromkeys(("uint64_t", "u_int64_t", "u_quad_t", "u_longlong_t"), Prim("uhyper")),
    "bool_t": Prim("bool"),
    "netobj": VOpaque(MAX_NETOBJ_SZ),
    "des_block": FOpaque(8),
}
# Constants of the C headers rpcgen's output includes (rpc/types.h, rpc/auth.h).
_BUILTIN_CONSTS = {"TRUE": 1, "FALSE": 0, "MAX_NETOBJ_SZ": MAX_NETOBJ_SZ, "MAX_AUTH_BYTES": 400,
                   "MAXNETNAMELEN": 255}


# --------------------------------------------------------------------------
# Preprocessor and lexer

@dataclass(frozen=True)
class Token:
    kind: str  # "ident", "num", "punct", "eof"
    value: str
    loc: Loc


_TOKEN_RE = re.compile(
    r"(?P<ws>\s+)|(?P<line>//.*)|(?P<block>/\*)"
    r"|(?P<num>-?(?:0[xX][0-9a-fA-F]+|[0-9]+))[uUlL]*"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<punct>[{}()\[\]<>;,=:*])"
    r'|(?P<str>"(?:[^"\\]|\\.)*")'
)
_PASSTHROUGH_DEFINE_RE = re.compile(r"%\s*#\s*define\s+([A-Za-z_]\w*)\s+([^/]+?)\s*(?:/[*/].*)?$")
_DIRECTIVE_RE = re.compile(r"\s*#\s*(\w*)\s*(.*?)\s*$")
_EXPR_TOKEN_RE = re.compile(r"\s*([A-Za-z_]\w*|0[xX][0-9a-fA-F]+|\d+|&&|\|\||==|!=|<=|>=|<<|>>|"
                            r"[-+*/%<>()!~&|^])")
_EXPR_OPS = {"&&": " and ", "||": " or ", "!": " not ", "/": "//"}


def _parse_int(text: str, loc: Loc) -> int:
    neg = text.startswith("-")
    digits = text[1:] if neg else text
    try:
        if digits[:2] in ("0x", "0X"):
            value = int(digits[2:], 16)
        elif len(digits) > 1 and digits[0] == "0":
            value = int(digits[1:], 8)
        else:
            value = int(digits)
    except ValueError:
        raise XdrgenError(f"{loc}: bad number {text!r}") from None
    return -value if neg else value


def _eval_expr(text: str, lookup: Callable[[str], int], loc: Loc) -> int:
    """Evaluate a C integer expression (constants, #if conditions) with names from ``lookup``."""
    toks = _EXPR_TOKEN_RE.findall(text)
    if "".join(toks) != re.sub(r"\s+", "", text) or not toks:
        raise XdrgenError(f"{loc}: cannot evaluate {text!r}")
    out = []
    for t in toks:
        if t[0].isalpha() or t[0] == "_":
            out.append(f"({lookup(t)})")
        elif t[0].isdigit():
            out.append(str(_parse_int(t, loc)))
        else:
            out.append(_EXPR_OPS.get(t, t))
    try:
        return int(eval("".join(out), {"__builtins__": {}}))
    except Exception:
        raise XdrgenError(f"{loc}: cannot evaluate {text!r}") from None


class _Preprocessor:
    """Turns source files into tokens, following the directives rpcgen's cpp would."""

    def __init__(self, include_dirs: Sequence[str], defines: Mapping[str, str]) -> None:
        self.include_dirs = list(include_dirs)
        self.macros: dict[str, str] = dict(defines)
        self.tokens: list[Token] = []
        # "%#define NAME value" lines: C macros that rpcgen's output uses, e.g. as bounds
        self.c_defines: dict[str, tuple[str, Loc]] = {}

    def run(self, source: str, filename: str, depth: int = 0) -> None:
        if depth > 20:
            raise XdrgenError(f"{filename}:1: #include nested too deeply")
        stack: list[tuple[bool, bool]] = []  # (this branch active, some branch taken)
        in_comment = False
        lines = source.splitlines()
        lineno = 0
        while lineno < len(lines):
            line = lines[lineno]
            lineno += 1
            loc = Loc(filename, lineno)
            while line.endswith("\\") and lineno < len(lines):  # continuation line
                line = line[:-1] + " " + lines[lineno]
                lineno += 1
            active = all(a for a, _ in stack)
            if not in_comment:
                stripped = line.lstrip()
                if stripped.startswith("%"):
                    m = _PASSTHROUGH_DEFINE_RE.match(stripped)
                    if m and active:
                        self.c_defines.setdefault(m.group(1), (m.group(2), loc))
                    continue
                if stripped.startswith("#"):
                    self._directive(line, loc, stack, active, depth)
                    continue
            if active:
                in_comment = self._lex_line(line, loc, in_comment)
            elif in_comment or "/*" in line:
                in_comment = self._skip_comments(line, in_comment)
        if stack:
            raise XdrgenError(f"{filename}:{len(source.splitlines())}: unterminated #if")

    @staticmethod
    def _skip_comments(line: str, in_comment: bool) -> bool:
        pos = 0
        while True:
            if in_comment:
                end = line.find("*/", pos)
                if end < 0:
                    return True
                pos, in_comment = end + 2, False
            else:
                start = line.find("/*", pos)
                if start < 0:
                    return False
                pos, in_comment = start + 2, True

    def _lex_line(self, line: str, loc: Loc, in_comment: bool) -> bool:
        pos = 0
        n = len(line)
        while pos < n:
            if in_comment:
                end = line.find("*/", pos)
                if end < 0:
                    return True
                pos, in_comment = end + 2, False
                continue
            m = _TOKEN_RE.match(line, pos)
            if m is None:
                raise XdrgenError(f"{loc}: unexpected character {line[pos]!r}")
            pos = m.end()
            kind = m.lastgroup
            if kind == "block":
                in_comment = True
            elif kind == "num":
                self.tokens.append(Token("num", m.group("num"), loc))
            elif kind == "ident":
                self._ident(m.group(kind), loc)
            elif kind in ("punct", "str"):
                self.tokens.append(Token(kind, m.group(kind), loc))
        return in_comment

    def _ident(self, name: str, loc: Loc) -> None:
        body = self.macros.get(name)
        if body is None:
            self.tokens.append(Token("ident", name, loc))
            return
        saved = self.macros.pop(name)  # no recursive expansion of itself
        try:
            self._lex_line(body, loc, False)
        finally:
            self.macros[name] = saved

    def _directive(self, line: str, loc: Loc, stack: list[tuple[bool, bool]],
                   active: bool, depth: int) -> None:
        m = _DIRECTIVE_RE.match(line)
        assert m is not None
        word, rest = m.group(1), re.sub(r"/\*.*?\*/|//.*", "", m.group(2)).strip()
        if word in ("if", "ifdef", "ifndef"):
            if not active:
                stack.append((False, True))
                return
            if word == "if":
                cond = self._eval_if(rest, loc)
            else:
                cond = (rest.split()[0] if rest else "") in self.macros
                cond = cond if word == "ifdef" else not cond
            stack.append((cond, cond))
        elif word in ("else", "elif"):
            if not stack:
                raise XdrgenError(f"{loc}: #{word} without #if")
            _, taken = stack.pop()
            parent = all(a for a, _ in stack)
            cond = not taken if word == "else" else (not taken and parent
                                                      and self._eval_if(rest, loc))
            stack.append((cond, taken or cond))
        elif word == "endif":
            if not stack:
                raise XdrgenError(f"{loc}: #endif without #if")
            stack.pop()
        elif not active:
            return
        elif word == "define":
            dm = re.match(r"([A-Za-z_]\w*)(\(?)\s*(.*)", rest)
            if dm is None:
                raise XdrgenError(f"{loc}: bad #define")
            if not dm.group(2):  # function-like macros are not expanded
                self.macros[dm.group(1)] = dm.group(3)
        elif word == "undef":
            self.macros.pop(rest.split()[0] if rest else "", None)
        elif word == "include":
            self._include(rest, loc, depth)
        elif word == "error":
            raise XdrgenError(f"{loc}: #error {rest}")
        elif word not in ("pragma", "line", "ident", "") and not word.isdigit():
            raise XdrgenError(f"{loc}: unknown directive #{word}")

    def _include(self, rest: str, loc: Loc, depth: int) -> None:
        m = re.match(r'["<]([^">]+)[">]', rest)
        if m is None:
            raise XdrgenError(f"{loc}: bad #include")
        dirs = [os.path.dirname(loc.file) or ".", *self.include_dirs]
        for d in dirs:
            path = os.path.join(d, m.group(1))
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    self.run(f.read(), path, depth + 1)
                return
        raise XdrgenError(f"{loc}: cannot find include file {m.group(1)!r}")

    def _eval_if(self, expr: str, loc: Loc) -> bool:
        expr = re.sub(r"defined\s*(?:\(\s*(\w+)\s*\)|(\w+))",
                      lambda m: "1" if (m.group(1) or m.group(2)) in self.macros else "0", expr)

        def lookup(name: str) -> int:
            value = self.macros.get(name, "0").strip() or "0"
            return _eval_expr(value, lambda _: 0, loc) if value != name else 0

        return bool(_eval_expr(expr, lookup, loc))


# --------------------------------------------------------------------------
# Parser

class _Parser:
    """Recursive-descent parser from tokens to definitions."""

    def __init__(self, tokens: list[Token], eof: Loc) -> None:
        self.tokens = [*tokens, Token("eof", "", eof)]
        self.pos = 0
        self.defs: list[Definition] = []

    def peek(self, offset: int = 0) -> Token:
        return self.tokens[min(self.pos + offset, len(self.tokens) - 1)]

    def next(self) -> Token:
        tok = self.peek()
        self.pos += 1
        return tok

    def error(self, message: str, tok: Token | None = None) -> XdrgenError:
        tok = tok or self.peek()
        found = tok.value if tok.kind != "eof" else "end of input"
        return XdrgenError(f"{tok.loc}: {message} (found {found!r})")

    def accept(self, value: str) -> bool:
        if self.peek().value == value and self.peek().kind in ("punct", "ident"):
            self.pos += 1
            return True
        return False

    def expect(self, value: str) -> Token:
        tok = self.peek()
        if tok.value != value or tok.kind not in ("punct", "ident"):
            raise self.error(f"expected {value!r}")
        return self.next()

    def ident(self) -> str:
        tok = self.peek()
        if tok.kind != "ident":
            raise self.error("expected an identifier")
        return self.next().value

    def value(self) -> Value:
        tok = self.next()
        if tok.kind == "num":
            return _parse_int(tok.value, tok.loc)
        if tok.kind == "ident":
            return tok.value
        raise self.error("expected a number or constant name", tok)

    def parse(self) -> list[Definition]:
        while self.peek().kind != "eof":
            self.definition()
        return self.defs

    def definition(self) -> None:
        tok = self.next()
        loc = tok.loc
        word = tok.value if tok.kind == "ident" else ""
        if word == "const":
            name = self.ident()
            self.expect("=")
            if self.peek().kind == "str":
                self.defs.append(ConstDef(name, StrLit(self.next().value), loc))
            else:
                self.defs.append(ConstDef(name, self.value(), loc))
        elif word == "typedef":
            decl = self.declaration(None, typedef=True)
            # name None: an inline body defined under the name; "typedef struct T T;" is C noise
            if decl.name is not None and decl.type != Ref(decl.name):
                self.defs.append(TypedefDef(decl.name, decl.type, loc))
        elif word in ("enum", "struct", "union"):
            name = self.ident()
            self.body(word, name, loc)
        elif word == "program":
            self.defs.append(self.program(loc))
        else:
            raise self.error("expected a definition", tok)
        self.expect(";")

    def body(self, kind: str, name: str, loc: Loc) -> None:
        if kind == "enum":
            self.defs.append(EnumDef(name, self.enum_body(), loc))
        elif kind == "struct":
            self.expect("{")
            fields = []
            while not self.accept("}"):
                fields.append(self.declaration(name))
                self.expect(";")
            if not fields:
                raise XdrgenError(f"{loc}: struct {name} has no fields")
            self.defs.append(StructDef(name, fields, loc))
        else:
            self.defs.append(self.union_body(name, loc))

    def enum_body(self) -> list[tuple[str, Value]]:
        self.expect("{")
        members: list[tuple[str, Value]] = []
        while True:
            name = self.ident()
            if self.accept("="):
                members.append((name, self.value()))
            else:  # rpcgen, like C, numbers unvalued members on from the previous one
                members.append((name, f"({members[-1][0]})+1" if members else 0))
            if not self.accept(","):
                break
        self.expect("}")
        return members

    def union_body(self, name: str, loc: Loc) -> UnionDef:
        self.expect("switch")
        self.expect("(")
        disc = self.declaration(name)
        self.expect(")")
        self.expect("{")
        arms: list[tuple[list[Value], Decl]] = []
        default: Decl | None = None
        while not self.accept("}"):
            if self.accept("default"):
                self.expect(":")
                default = self.declaration(name, arm=True)
                self.expect(";")
                continue
            values: list[Value] = []
            while self.accept("case"):
                values.append(self.value())
                self.expect(":")
            if not values:
                raise self.error("expected 'case' or 'default'")
            arms.append((values, self.declaration(name, arm=True)))
            self.expect(";")
        if not arms and default is None:
            raise XdrgenError(f"{loc}: union {name} has no arms")
        return UnionDef(name, disc, arms, default, loc)

    def type_spec(self, outer: str | None, proc: bool = False) -> TypeExpr | tuple[str, Loc]:
        """A type specifier; an inline enum/struct/union body is returned as (kind, loc)."""
        tok = self.next()
        if tok.kind != "ident":
            raise self.error("expected a type", tok)
        word = tok.value
        if word == "unsigned":
            nxt = self.peek().value
            if nxt in ("int", "long", "short", "char"):
                self.next()
            elif nxt == "hyper":
                self.next()
                return Prim("uhyper")
            return Prim("uint")
        if word in ("int", "long", "short", "char"):
            return Prim("int")
        if word in ("hyper", "float", "double", "bool", "quadruple"):
            return Prim(word)
        if word in ("enum", "struct", "union"):
            if self.peek().value in ("{", "switch"):
                return (word, tok.loc)
            return Ref(self.ident())
        if proc and word == "string":
            return String(UNBOUNDED)
        if word in ("opaque", "string", "void", "typedef", "const", "program", "version"):
            raise self.error("expected a type", tok)
        return Ref(word)

    def declaration(self, outer: str | None, typedef: bool = False, arm: bool = False) -> Decl:
        loc = self.peek().loc
        if self.peek().value == "void" and arm:
            self.next()
            return Decl(None, Void(), loc)
        if self.peek().value in ("opaque", "string"):
            word = self.next().value
            name = self.ident()
            if word == "opaque" and self.accept("["):
                size = self.value()
                self.expect("]")
                return Decl(name, FOpaque(size), loc)
            self.expect("<")
            bound: Value = UNBOUNDED if self.peek().value == ">" else self.value()
            self.expect(">")
            return Decl(name, VOpaque(bound) if word == "opaque" else String(bound), loc)
        spec = self.type_spec(outer)
        inline: Definition | None = None
        if isinstance(spec, tuple):  # an anonymous enum/struct/union body, named below
            self.body(spec[0], f"{outer}_", spec[1])
            inline = self.defs[-1]
        pointer = self.accept("*")
        name = self.ident()
        if inline is not None:
            if typedef and not pointer and self.peek().value == ";":
                inline.name = name  # "typedef struct {...} T;" defines T itself
                return Decl(None, Void(), loc)
            inline.name = f"{outer or name}_{name}"
            spec = Ref(inline.name)
        assert not isinstance(spec, tuple)
        if pointer:
            return Decl(name, Opt(spec), loc)
        if self.accept("["):
            size = self.value()
            self.expect("]")
            return Decl(name, FArray(spec, size), loc)
        if self.accept("<"):
            bound = UNBOUNDED if self.peek().value == ">" else self.value()
            self.expect(">")
            return Decl(name, VArray(spec, bound), loc)
        return Decl(name, spec, loc)

    def program(self, loc: Loc) -> ProgramDef:
        name = self.ident()
        self.expect("{")
        versions = []
        while not self.accept("}"):
            vloc = self.expect("version").loc
            vname = self.ident()
            self.expect("{")
            procs = []
            while not self.accept("}"):
                ploc = self.peek().loc
                result = self._proc_type()
                pname = self.ident()
                self.expect("(")
                args: list[TypeExpr] = []
                while True:
                    arg = self._proc_type()
                    if self.peek().kind == "ident":
                        self.next()  # rpcgen -N style argument name
                    args.append(arg)
                    if not self.accept(","):
                        break
                self.expect(")")
                self.expect("=")
                procs.append(ProcDef(pname, self.value(), result,
                                     [a for a in args if not isinstance(a, Void)], ploc))
                self.expect(";")
            self.expect("=")
            versions.append(VersionDef(vname, self.value(), procs, vloc))
            self.expect(";")
        self.expect("=")
        if not versions:
            raise XdrgenError(f"{loc}: program {name} has no versions")
        return ProgramDef(name, self.value(), versions, loc)

    def _proc_type(self) -> TypeExpr:
        if self.accept("void"):
            return Void()
        spec = self.type_spec(None, proc=True)
        if isinstance(spec, tuple):
            raise self.error("inline type definitions are not allowed in procedures")
        if self.accept("*"):
            return Opt(spec)
        return spec


# --------------------------------------------------------------------------
# Semantic model

_RESERVED = {"len", "range", "list", "bytes", "bytearray", "memoryview", "int", "float",
             "bool", "str", "object", "property", "tuple", "dict", "type", "super"}
_ENUM_RESERVED = {"name", "value", "mro"}


def _field_name(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) or name.startswith("__") else name


def _class_name(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) or name in _RESERVED else name


_PRIM_CODES = {"int": ("i", 4), "uint": ("I", 4), "hyper": ("q", 8), "uhyper": ("Q", 8),
               "float": ("f", 4), "double": ("d", 8), "bool": ("I", 4)}
_PRIM_PY = {"int": "int", "uint": "int", "hyper": "int", "uhyper": "int", "float": "float",
            "double": "float", "bool": "bool"}
_MAX_FLAT_SLOTS = 96
_PRIM_XDR = {"uint": "unsigned int", "uhyper": "unsigned hyper"}
_UNPACK_DOC = '    """Decode a {} at ``off``; return it and the next offset."""'
_MAX_UNROLL = 16


@dataclass
class _Slot:
    code: str
    size: int


def _spell(t: TypeExpr) -> str:
    """``t`` as it is written in a .x file (``int``, ``opaque<16>``, ``entry *``...),
    to name an anonymous type in error messages."""
    def bound(b: Value) -> str:
        return "" if b == UNBOUNDED else str(b)

    if isinstance(t, Prim):
        return _PRIM_XDR.get(t.kind, t.kind)
    if isinstance(t, Ref):
        return t.name
    if isinstance(t, FOpaque):
        return f"opaque[{t.size}]"
    if isinstance(t, VOpaque):
        return f"opaque<{bound(t.bound)}>"
    if isinstance(t, String):
        return f"string<{bound(t.bound)}>"
    if isinstance(t, FArray):
        return f"{_spell(t.elem)}[{t.size}]"
    if isinstance(t, VArray):
        return f"{_spell(t.elem)}<{bound(t.bound)}>"
    if isinstance(t, Opt):
        return f"{_spell(t.elem)} *"
    return "void"


def _fstring_text(text: str) -> str:
    """``text`` escaped to sit verbatim inside a generated ``f"..."`` literal."""
    return (text.replace("\\", "\\\\").replace('"', '\\"')
            .replace("{", "{{").replace("}", "}}"))


@dataclass
class ExternDef:
    """A type the file uses but does not define, taken from an imported module."""

    name: str
    loc: Loc


class _Model:
    """Resolved definitions: constants evaluated, sizes known, names checked."""

    def __init__(self, defs: list[Definition], c_defines: Mapping[str, tuple[str, Loc]],
                 externs: bool) -> None:
        self.defs = defs
        self.c_defines = c_defines
        self.externs = externs
        self.consts: dict[str, Value | StrLit] = {}
        self.const_locs: dict[str, Loc] = {}
        self.types: dict[str, Definition | ExternDef] = {}
        self._const_cache: dict[str, int] = {}
        self._evaluating: set[str] = set()
        names: dict[str, Loc] = {}

        def claim(name: str, loc: Loc) -> None:
            if name in names:
                raise XdrgenError(f"{loc}: {name!r} already defined at {names[name]}")
            names[name] = loc

        for d in defs:
            claim(d.name, d.loc)
            if isinstance(d, ConstDef):
                self.consts[d.name] = d.value
                self.const_locs[d.name] = d.loc
            elif not isinstance(d, ProgramDef):
                self.types[d.name] = d
                if isinstance(d, EnumDef):
                    for mname, mvalue in d.members:
                        claim(mname, d.loc)
                        self.consts[mname] = mvalue
                        self.const_locs[mname] = d.loc

    def const(self, value: Value, loc: Loc) -> int:
        """The integer value of a literal, constant name or expression of constants."""
        if isinstance(value, int):
            return value
        if value in self._const_cache:
            return self._const_cache[value]
        if value in self._evaluating:
            raise XdrgenError(f"{loc}: constant {value!r} is defined in terms of itself")
        self._evaluating.add(value)
        try:
            if value in self.consts:
                v = self.consts[value]
                if isinstance(v, StrLit):
                    raise XdrgenError(f"{loc}: constant {value!r} is a string, not a number")
                result = self.const(v, self.const_locs[value])
            elif value in _BUILTIN_CONSTS:
                result = _BUILTIN_CONSTS[value]
            elif value in self.c_defines:
                text, dloc = self.c_defines[value]
                result = _eval_expr(text, lambda name: self.const(name, dloc), dloc)
            elif re.fullmatch(r"[A-Za-z_]\w*", value):
                raise XdrgenError(f"{loc}: unknown constant {value!r}")
            else:
                result = _eval_expr(value, lambda name: self.const(name, loc), loc)
        finally:
            self._evaluating.discard(value)
        self._const_cache[value] = result
        return result

    def size(self, value: Value, loc: Loc, what: str) -> int:
        n = self.const(value, loc)
        if not 0 <= n <= UNBOUNDED:
            raise XdrgenError(f"{loc}: {what} {n} is out of range")
        return n

    def resolve_type(self, t: TypeExpr, loc: Loc) -> TypeExpr:
        """Check names, evaluate sizes and substitute rpcgen's library types."""
        if isinstance(t, Ref):
            if t.name in self.types:
                return t
            if t.name in _BUILTIN_TYPES:
                return self.resolve_type(_BUILTIN_TYPES[t.name], loc)
            if self.externs:
                self.types[t.name] = ExternDef(t.name, loc)
                return t
            raise XdrgenError(f"{loc}: unknown type {t.name!r} (define it, #include the .x "
                              "file that does, or import the module that does)")
        if isinstance(t, Prim) and t.kind == "quadruple":
            raise XdrgenError(f"{loc}: quadruple is not supported")
        if isinstance(t, FOpaque):
            return FOpaque(self.size(t.size, loc, "opaque size"))
        if isinstance(t, VOpaque):
            return VOpaque(self.size(t.bound, loc, "opaque bound"))
        if isinstance(t, String):
            return String(self.size(t.bound, loc, "string bound"))
        if isinstance(t, FArray):
            return FArray(self.resolve_type(t.elem, loc), self.size(t.size, loc, "array size"))
        if isinstance(t, VArray):
            return VArray(self.resolve_type(t.elem, loc), self.size(t.bound, loc, "array bound"))
        if isinstance(t, Opt):
            return Opt(self.resolve_type(t.elem, loc))
        return t


@dataclass
class _Func:
    """The body of one generated function being built."""

    lines: list[str] = field(default_factory=list)
    counter: int = 0

    def tmp(self, prefix: str = "_t") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def add(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


class _Generator:
    """Emits the Python module for a resolved model."""

    def __init__(self, model: _Model, source_name: str, opaque_views: bool,
                 imports: Sequence[str]) -> None:
        self.m = model
        self.imports = list(imports)
        self.source_name = source_name
        self.opaque_views = opaque_views
        self.structs: dict[str, str] = {}  # format -> module variable
        self.out: list[str] = []
        self.anon: dict[TypeExpr, tuple[str, str, str]] = {}
        self.args_funcs: dict[tuple[TypeExpr, ...], str] = {}
        self.resolved: dict[str, object] = {}
        self._min: dict[str, int] = {}
        self._visiting: set[str] = set()
        self._flat_cache: dict[TypeExpr, list[_Slot] | None] = {}
        self._resolve_all()
        self.linked = {name for name, d in self.m.types.items()
                       if isinstance(d, StructDef) and self._is_linked(name)}

    # -- resolution helpers ------------------------------------------------

    def _resolve_all(self) -> None:
        for name, d in list(self.m.types.items()):
            if isinstance(d, TypedefDef):
                self.resolved[name] = self.m.resolve_type(d.type, d.loc)
            elif isinstance(d, StructDef):
                self.resolved[name] = [(f.name, self.m.resolve_type(f.type, f.loc))
                                       for f in d.fields]
            elif isinstance(d, UnionDef):
                disc = self.m.resolve_type(d.disc.type, d.loc)
                kind = self.disc_kind(disc, d.loc)
                seen: set[int] = set()
                arms = []
                for values, decl in d.arms:
                    ints = [self.m.const(v, decl.loc) for v in values]
                    for v in ints:
                        if v in seen:
                            raise XdrgenError(f"{decl.loc}: duplicate case {v} in union {name}")
                        seen.add(v)
                    arms.append((ints, decl.name, self.m.resolve_type(decl.type, decl.loc)))
                default = None
                if d.default is not None:
                    default = (d.default.name,
                               self.m.resolve_type(d.default.type, d.default.loc))
                self.resolved[name] = (d.disc.name, kind, arms, default)
            elif isinstance(d, EnumDef):
                members = [(mname, self.m.const(v, d.loc)) for mname, v in d.members]
                for mname, v in members:
                    if not -2**31 <= v < 2**31:
                        raise XdrgenError(f"{d.loc}: enum value {mname} = {v} out of range")
                self.resolved[name] = members
        for name in list(self.m.types):
            self.min_size(Ref(name), self.m.types[name].loc)

    def disc_kind(self, t: TypeExpr, loc: Loc) -> str:
        t = self.base(t)
        if isinstance(t, Prim) and t.kind in ("int", "uint", "bool"):
            return t.kind
        if isinstance(t, Ref) and isinstance(self.m.types[t.name], EnumDef):
            return "enum:" + t.name
        raise XdrgenError(f"{loc}: a union discriminant must be int, unsigned int, bool or enum")

    def base(self, t: TypeExpr) -> TypeExpr:
        """Follow typedef references to the type they stand for."""
        seen = set()
        while isinstance(t, Ref) and isinstance(self.m.types[t.name], TypedefDef):
            if t.name in seen:
                raise XdrgenError(f"{self.m.types[t.name].loc}: typedef {t.name} refers to itself")
            seen.add(t.name)
            t = self.resolved[t.name]  # type: ignore[assignment]
        return t

    def _is_linked(self, name: str) -> bool:
        fields = self.resolved[name]
        assert isinstance(fields, list)
        links = [i for i, (_, ft) in enumerate(fields)
                 if isinstance(self.base(ft), Opt) and self.base(self.base(ft).elem) == Ref(name)]
        return links == [len(fields) - 1] and len(fields) > 1  # one link, last: a list

    def linked_list_of(self, t: TypeExpr) -> str | None:
        """The struct name if ``t`` (already a base type) is an optional linked struct."""
        if isinstance(t, Opt):
            e = self.base(t.elem)
            if isinstance(e, Ref) and e.name in self.linked:
                return e.name
        return None

    def min_size(self, t: TypeExpr, loc: Loc) -> int:
        """Smallest encoding of a value of ``t``; rejects infinitely recursive types."""
        if isinstance(t, Prim):
            return _PRIM_CODES[t.kind][1]
        if isinstance(t, FOpaque):
            return t.size + (-t.size & 3)  # type: ignore[operator]
        if isinstance(t, (VOpaque, String, VArray, Opt)):
            return 4
        if isinstance(t, Void):
            return 0
        if isinstance(t, FArray):
            return t.size * self.min_size(t.elem, loc)  # type: ignore[operator]
        assert isinstance(t, Ref)
        if t.name in self._min:
            return self._min[t.name]
        if t.name in self._visiting:
            raise XdrgenError(f"{self.m.types[t.name].loc}: type {t.name} contains itself "
                              "without an optional (*) or array in between")
        d = self.m.types[t.name]
        if isinstance(d, ExternDef):
            return 1  # unknown here: the weakest assumption that still bounds counts
        self._visiting.add(t.name)
        r = self.resolved[t.name]
        if isinstance(d, EnumDef):
            size = 4
        elif isinstance(d, TypedefDef):
            size = self.min_size(r, d.loc)  # type: ignore[arg-type]
        elif isinstance(d, StructDef):
            size = sum(self.min_size(ft, d.loc) for _, ft in r)  # type: ignore[union-attr]
        else:
            _, _, arms, default = r  # type: ignore[misc]
            options = [self.min_size(at, d.loc) for _, _, at in arms]
            if default is not None:
                options.append(self.min_size(default[1], d.loc))
            size = 4 + min(options)
        self._visiting.discard(t.name)
        self._min[t.name] = size
        return size

    # -- Python types for annotations -----------------------------------------

    def pytype(self, t: TypeExpr) -> str:
        if isinstance(t, Prim):
            return _PRIM_PY[t.kind]
        if isinstance(t, (FOpaque, String)):
            return "bytes"
        if isinstance(t, VOpaque):
            return "memoryview" if self.opaque_views else "bytes"
        if isinstance(t, (FArray, VArray)):
            return f"list[{self.pytype(t.elem)}]"
        if isinstance(t, Opt):
            ll = self.linked_list_of(self.base(t))
            return f"list[{_class_name(ll)}]" if ll else f"{self.pytype(t.elem)} | None"
        if isinstance(t, Void):
            return "None"
        if t.name in self.linked:
            return f"list[{_class_name(t.name)}]"
        return _class_name(t.name)

    # -- fixed-size ("flat") layouts ------------------------------------------

    def flat(self, t: TypeExpr) -> list[_Slot] | None:
        """The struct codes of ``t`` if it is fixed-size and cheap to unroll, else None."""
        t = self.base(t)
        if t in self._flat_cache:
            return self._flat_cache[t]
        self._flat_cache[t] = None  # guards recursion
        slots: list[_Slot] | None = None
        if isinstance(t, Prim):
            code, size = _PRIM_CODES[t.kind]
            slots = [_Slot(code, size)]
        elif isinstance(t, FOpaque):
            n = int(t.size)
            slots = [_Slot(f"{n}s" + (f"{-n & 3}x" if n & 3 else ""), n + (-n & 3))]
        elif isinstance(t, FArray) and int(t.size) <= _MAX_UNROLL:
            sub = self.flat(t.elem)
            slots = None if sub is None else sub * int(t.size)
        elif isinstance(t, Ref):
            d = self.m.types[t.name]
            if isinstance(d, EnumDef):
                slots = [_Slot("i", 4)]
            elif isinstance(d, StructDef) and t.name not in self.linked:
                slots = []
                for _, ft in self.resolved[t.name]:  # type: ignore[union-attr]
                    sub = self.flat(ft)
                    if sub is None:
                        slots = None
                        break
                    slots += sub
        if slots is not None and len(slots) > _MAX_FLAT_SLOTS:
            slots = None
        self._flat_cache[t] = slots
        return slots

    def struct_var(self, codes: str) -> str:
        fmt = ">" + codes
        if fmt not in self.structs:
            self.structs[fmt] = f"_s{len(self.structs)}"
        return self.structs[fmt]

    def flat_pack_args(self, t: TypeExpr, expr: str, fn: _Func, ind: int) -> list[str]:
        """Expressions (one per slot) that give the wire values of ``expr``."""
        t = self.base(t)
        if isinstance(t, Prim):
            return [f"_BOOL_ENC[{expr}]" if t.kind == "bool" else expr]
        if isinstance(t, FOpaque):
            fn.add(ind, f"_check_fixed({expr}, {t.size})")
            return [expr]
        if isinstance(t, FArray):
            fn.add(ind, f"_check_fixed({expr}, {t.size})")
            out = []
            for i in range(int(t.size)):
                out += self.flat_pack_args(t.elem, f"{expr}[{i}]", fn, ind)
            return out
        assert isinstance(t, Ref)
        if isinstance(self.m.types[t.name], EnumDef):
            return [f"_m_{t.name}[{expr}]"]
        out = []
        for fname, ft in self.resolved[t.name]:  # type: ignore[union-attr]
            out += self.flat_pack_args(ft, f"{expr}.{_field_name(fname)}", fn, ind)
        return out

    def flat_value(self, t: TypeExpr, names: Iterator[str]) -> str:
        """An expression building the value of ``t`` from its unpacked slot variables."""
        t = self.base(t)
        if isinstance(t, Prim):
            name = next(names)
            return f"_BOOL_DEC[{name}]" if t.kind == "bool" else name
        if isinstance(t, FOpaque):
            return next(names)
        if isinstance(t, FArray):
            return "[" + ", ".join(self.flat_value(t.elem, names)
                                   for _ in range(int(t.size))) + "]"
        assert isinstance(t, Ref)
        if isinstance(self.m.types[t.name], EnumDef):
            return f"_m_{t.name}[{next(names)}]"
        args = [self.flat_value(ft, names) for _, ft in self.resolved[t.name]]  # type: ignore
        return f"{_class_name(t.name)}({', '.join(args)})"

    def emit_flat_unpack(self, items: list[tuple[TypeExpr, str]], fn: _Func, ind: int,
                         assign: bool = True) -> list[str]:
        """Unpack several fixed-size values with one struct call.

        With ``assign`` the values are stored in the named targets; without,
        the expressions that build them are returned instead.
        """
        slots = [s for t, _ in items for s in self.flat(t) or ()]
        names = [fn.tmp("_a") for _ in slots]
        var = self.struct_var("".join(s.code for s in slots))
        size = sum(s.size for s in slots)
        lhs = ", ".join(names) + ("," if len(names) == 1 else "")
        fn.add(ind, f"{lhs} = {var}.unpack_from(mv, off)")
        fn.add(ind, f"off += {size}")
        it = iter(names)
        exprs = [self.flat_value(t, it) for t, _ in items]
        if assign:
            for (_, target), expr in zip(items, exprs, strict=True):
                fn.add(ind, f"{target} = {expr}")
        return exprs

    def emit_flat_pack(self, items: list[tuple[TypeExpr, str]], fn: _Func, ind: int,
                       lead: tuple[str, str] | None = None) -> None:
        """Pack several fixed-size values (optionally after a leading slot) in one call."""
        codes = lead[0] if lead else ""
        args = [lead[1]] if lead else []
        for t, expr in items:
            codes += "".join(s.code for s in self.flat(t) or ())
            args += self.flat_pack_args(t, expr, fn, ind)
        fn.add(ind, f"buf += {self.struct_var(codes)}.pack({', '.join(args)})")

    # -- general statements ---------------------------------------------------

    def emit_pack(self, t: TypeExpr, expr: str, fn: _Func, ind: int) -> None:
        """Statements appending the encoding of ``expr`` (of type ``t``) to ``buf``."""
        t = self.base(t)
        if isinstance(t, Void):
            return
        if self.flat(t) is not None:
            self.emit_flat_pack([(t, expr)], fn, ind)
        elif isinstance(t, VOpaque):
            fn.add(ind, f"_pack_opaque(buf, {expr}, {t.bound})")
        elif isinstance(t, String):
            fn.add(ind, f"_pack_string(buf, {expr}, {t.bound})")
        elif isinstance(t, FOpaque):
            fn.add(ind, f"_pack_fopaque(buf, {expr}, {t.size})")
        elif isinstance(t, Opt):
            ll = self.linked_list_of(t)
            if ll:
                fn.add(ind, f"_pack_list_{ll}(buf, {expr})")
                return
            var = fn.tmp()
            fn.add(ind, f"{var} = {expr}")
            fn.add(ind, f"if {var} is None:")
            fn.add(ind + 1, "buf += _FALSE")
            fn.add(ind, "else:")
            fn.add(ind + 1, "buf += _TRUE")
            self.emit_pack(t.elem, var, fn, ind + 1)
        elif isinstance(t, (FArray, VArray)):
            var = fn.tmp()
            fn.add(ind, f"{var} = {expr}")
            if isinstance(t, FArray):
                fn.add(ind, f"_check_fixed({var}, {t.size})")
            else:
                fn.add(ind, f"buf += _UINT.pack(_check_count({var}, {t.bound}))")
            elem = self.base(t.elem)
            if isinstance(elem, Prim) and elem.kind != "bool":
                fn.add(ind, f"_pack_prims(buf, {_PRIM_CODES[elem.kind][0]!r}, {var})")
                return
            item = fn.tmp("_i")
            fn.add(ind, f"for {item} in {var}:")
            self.emit_pack(elem, item, fn, ind + 1)
        else:
            assert isinstance(t, Ref)
            fn.add(ind, f"pack_{t.name}(buf, {expr})")

    def emit_unpack(self, t: TypeExpr, target: str, fn: _Func, ind: int) -> None:
        """Statements decoding a value of ``t`` at ``off`` into ``target``, advancing ``off``."""
        t = self.base(t)
        if isinstance(t, Void):
            fn.add(ind, f"{target} = None")
        elif self.flat(t) is not None:
            self.emit_flat_unpack([(t, target)], fn, ind)
        elif isinstance(t, VOpaque):
            helper = "_unpack_opaque_view" if self.opaque_views else "_unpack_opaque"
            fn.add(ind, f"{target}, off = {helper}(mv, off, {t.bound})")
        elif isinstance(t, String):
            fn.add(ind, f"{target}, off = _unpack_opaque(mv, off, {t.bound})")
        elif isinstance(t, FOpaque):
            helper = "_unpack_fopaque_view" if self.opaque_views else "_unpack_fopaque"
            fn.add(ind, f"{target}, off = {helper}(mv, off, {t.size})")
        elif isinstance(t, Opt):
            ll = self.linked_list_of(t)
            if ll:
                fn.add(ind, f"{target}, off = _unpack_list_{ll}(mv, off)")
                return
            flag = fn.tmp("_b")
            fn.add(ind, f"{flag}, = _UINT.unpack_from(mv, off)")
            fn.add(ind, "off += 4")
            fn.add(ind, f"if _BOOL_DEC[{flag}]:")
            self.emit_unpack(t.elem, target, fn, ind + 1)
            fn.add(ind, "else:")
            fn.add(ind + 1, f"{target} = None")
        elif isinstance(t, (FArray, VArray)):
            elem = self.base(t.elem)
            minsize = max(self.min_size(elem, Loc(self.source_name, 0)), 1)
            if isinstance(t, FArray):
                count = str(t.size)
                fn.add(ind, f"if len(mv) - off < {int(t.size) * minsize}:")
                fn.add(ind + 1, f"raise _XdrError('truncated array of {t.size} elements')")
            else:
                count = fn.tmp("_n")
                fn.add(ind, f"{count}, off = _unpack_count(mv, off, {t.bound}, {minsize})")
            if isinstance(elem, Prim) and elem.kind != "bool":
                code, size = _PRIM_CODES[elem.kind]
                fn.add(ind, f"{target}, off = _unpack_prims({code!r}, {size}, mv, off, {count})")
                return
            item = fn.tmp("_e")
            fn.add(ind, f"{target} = []")
            fn.add(ind, f"for _ in range({count}):")
            self.emit_unpack(elem, item, fn, ind + 1)
            fn.add(ind + 1, f"{target}.append({item})")
        else:
            assert isinstance(t, Ref)
            fn.add(ind, f"{target}, off = unpack_{t.name}(mv, off)")

    def emit_fields_pack(self, fields: list[tuple[str | None, TypeExpr]], fn: _Func,
                         ind: int) -> None:
        run: list[tuple[TypeExpr, str]] = []
        for fname, ft in fields:
            expr = f"v.{_field_name(fname or '')}"
            if self.flat(ft) is not None:
                run.append((ft, expr))
                continue
            if run:
                self.emit_flat_pack(run, fn, ind)
                run = []
            self.emit_pack(ft, expr, fn, ind)
        if run:
            self.emit_flat_pack(run, fn, ind)

    def emit_fields_unpack(self, fields: list[tuple[str | None, TypeExpr]], fn: _Func,
                           ind: int) -> list[str]:
        """Decode struct fields; return the expressions of their values, in order."""
        values = []
        run: list[tuple[TypeExpr, str]] = []
        for _, ft in fields:
            if self.flat(ft) is not None:
                run.append((ft, ""))
                continue
            if run:
                values += self.emit_flat_unpack(run, fn, ind, assign=False)
                run = []
            target = fn.tmp("_f")
            self.emit_unpack(ft, target, fn, ind)
            values.append(target)
        if run:
            values += self.emit_flat_unpack(run, fn, ind, assign=False)
        return values

    # -- functions ------------------------------------------------------------

    def function(self, header: str, fn: _Func, what: str, error_verb: str,
                 tail: list[str]) -> None:
        self.out.append(header)
        self.out.append("    try:")
        self.out += ["    " + line for line in fn.lines] or ["        pass"]
        self.out.append("    except _StructError as e:")
        self.out.append(f"        raise _XdrError(f\"cannot {error_verb} "
                        f"{_fstring_text(what)}: {{e}}\") from None")
        self.out += tail
        self.out.append("")
        self.out.append("")

    def codec_functions(self, name: str, t: TypeExpr | None, py: str) -> None:
        """pack_/unpack_ (if ``t`` given) and encode_/decode_ functions for a named type."""
        if t is not None:
            fn = _Func()
            self.emit_pack(t, "v", fn, 1)
            self.function(f"def pack_{name}(buf: bytearray, v: {py}) -> None:\n"
                          f"    \"\"\"Append the XDR encoding of a {name} to ``buf``.\"\"\"",
                          fn, name, "encode", [])
            fn = _Func()
            self.emit_unpack(t, "v", fn, 1)
            self.function(f"def unpack_{name}(mv: memoryview, off: int) -> tuple[{py}, int]:\n"
                          + _UNPACK_DOC.format(name),
                          fn, name, "decode", ["    return v, off"])
        self.out.append(f"def encode_{name}(v: {py}) -> bytes:\n"
                        f"    \"\"\"The XDR encoding of a {name}.\"\"\"\n"
                        f"    buf = bytearray()\n"
                        f"    pack_{name}(buf, v)\n"
                        f"    return bytes(buf)\n\n")
        self.out.append(f"def decode_{name}(data: _Any) -> {py}:\n"
                        f"    \"\"\"Decode a {name} filling all of ``data`` (any buffer).\"\"\"\n"
                        f"    return _decode_with(unpack_{name}, data)\n\n")

    def gen_enum(self, name: str) -> None:
        cls = _class_name(name)
        members = self.resolved[name]
        self.out.append(f"class {cls}(_IntEnum):")
        self.out.append(f"    \"\"\"enum {name}.\"\"\"")
        self.out.append("")
        for mname, v in members:  # type: ignore[union-attr]
            self.out.append(f"    {self.enum_member(mname)} = {v}")
        self.out.append("")
        self.out.append("")
        self.out.append(f"_m_{name} = _EnumMap.of({cls})")
        for mname, _ in members:  # type: ignore[union-attr]
            self.out.append(f"{_class_name(mname)} = {cls}.{self.enum_member(mname)}")
        self.out.append("")
        self.out.append("")
        self.codec_functions(name, Ref(name), cls)

    @staticmethod
    def enum_member(name: str) -> str:
        bad = keyword.iskeyword(name) or name in _ENUM_RESERVED or name.startswith("_")
        return name + "_" if bad else name

    def gen_struct(self, name: str) -> None:
        cls = _class_name(name)
        fields = self.resolved[name]
        assert isinstance(fields, list)
        linked = name in self.linked
        node_fields = fields[:-1] if linked else fields
        self.out.append("@_dataclass(slots=True)")
        self.out.append(f"class {cls}:")
        doc = f"struct {name}."
        if linked:
            doc += (f" A linked list: the link field {fields[-1][0]!r} is omitted, "
                    f"optional {name} values are list[{cls}].")
        self.out.append(f"    \"\"\"{doc}\"\"\"")
        self.out.append("")
        for fname, ft in node_fields:
            self.out.append(f"    {_field_name(fname)}: {self.pytype(ft)}")
        self.out.append("")
        self.out.append("")
        base_name = f"node_{name}" if linked else name
        fn = _Func()
        if self.flat(Ref(name)) is not None:
            self.emit_flat_pack([(Ref(name), "v")], fn, 1)
        else:
            self.emit_fields_pack(node_fields, fn, 1)
        self.function(f"def pack_{base_name}(buf: bytearray, v: {cls}) -> None:\n"
                      f"    \"\"\"Append the XDR encoding of a {name} to ``buf``.\"\"\"",
                      fn, name, "encode", [])
        fn = _Func()
        targets = self.emit_fields_unpack(node_fields, fn, 1)
        self.function(f"def unpack_{base_name}(mv: memoryview, off: int) "
                      f"-> tuple[{cls}, int]:\n"
                      f"    \"\"\"Decode a {name} at ``off``; return it and the next offset.\"\"\"",
                      fn, name, "decode", [f"    return {cls}({', '.join(targets)}), off"])
        if linked:
            self.gen_linked(name, cls)
        self.codec_functions(name, None, self.pytype(Ref(name)))

    def gen_linked(self, name: str, cls: str) -> None:
        self.out.append(
            f"def _pack_list_{name}(buf: bytearray, v: list[{cls}]) -> None:\n"
            f"    for node in v:\n"
            f"        buf += _TRUE\n"
            f"        pack_node_{name}(buf, node)\n"
            f"    buf += _FALSE\n\n\n"
            f"def _unpack_list_{name}(mv: memoryview, off: int) -> tuple[list[{cls}], int]:\n"
            f"    out: list[{cls}] = []\n"
            f"    try:\n"
            f"        while True:\n"
            f"            more, = _UINT.unpack_from(mv, off)\n"
            f"            off += 4\n"
            f"            if not _BOOL_DEC[more]:\n"
            f"                return out, off\n"
            f"            node, off = unpack_node_{name}(mv, off)\n"
            f"            out.append(node)\n"
            f"    except _StructError as e:\n"
            f"        raise _XdrError(f\"cannot decode {name} list: {{e}}\") from None\n\n\n"
            f"def pack_{name}(buf: bytearray, v: list[{cls}]) -> None:\n"
            f"    \"\"\"Append a {name} given as a non-empty list of nodes.\"\"\"\n"
            f"    if not v:\n"
            f"        raise _XdrError(\"a {name} needs at least one node\")\n"
            f"    pack_node_{name}(buf, v[0])\n"
            f"    _pack_list_{name}(buf, v[1:])\n\n\n"
            f"def unpack_{name}(mv: memoryview, off: int) -> tuple[list[{cls}], int]:\n"
            f"    \"\"\"Decode a {name} as a list of nodes (first node and its successors).\"\"\"\n"
            f"    node, off = unpack_node_{name}(mv, off)\n"
            f"    rest, off = _unpack_list_{name}(mv, off)\n"
            f"    rest.insert(0, node)\n"
            f"    return rest, off\n\n")

    def gen_union(self, name: str) -> None:
        cls = _class_name(name)
        disc_name, kind, arms, default = self.resolved[name]  # type: ignore[misc]
        dfield = _field_name(disc_name or "discriminant")
        vfield = "arm" if dfield == "value" else "value"
        if kind == "bool":
            dtype, code, dec, enc = "bool", "I", "_BOOL_DEC[{}]", "_BOOL_ENC[{}]"
        elif kind.startswith("enum:"):
            ename = kind[5:]
            dtype, code = _class_name(ename), "i"
            dec = enc = f"_m_{ename}[{{}}]"
        else:
            dtype, code, dec, enc = "int", "I" if kind == "uint" else "i", "{}", "{}"
        arm_types = {self.pytype(t) for _, _, t in arms}
        if default is not None:
            arm_types.add(self.pytype(default[1]))
        self.out.append("@_dataclass(slots=True)")
        self.out.append(f"class {cls}:")
        self.out.append(f"    \"\"\"union {name}: ``{vfield}`` holds the arm that ``{dfield}`` "
                        "selects (None for void).\"\"\"")
        self.out.append("")
        self.out.append(f"    {dfield}: {dtype}")
        self.out.append(f"    {vfield}: {' | '.join(sorted(arm_types))} = None")
        all_cases = [v for values, _, _ in arms for v in values]
        arm_names = [n for _, n, _ in arms] + ([default[0]] if default else [])
        for values, aname, at in arms + ([(None, default[0], default[1])] if default else []):
            if aname is None or arm_names.count(aname) > 1 or \
                    _field_name(aname) in (dfield, vfield):
                continue
            cond = (f"self.{dfield} in {tuple(all_cases)!r}" if values is None else
                    f"self.{dfield} not in {tuple(values)!r}")
            self.out.append("")
            self.out.append("    @property")
            self.out.append(f"    def {_field_name(aname)}(self) -> {self.pytype(at)}:")
            self.out.append(f"        \"\"\"The {aname} arm; AttributeError if not selected.\"\"\"")
            self.out.append(f"        if {cond}:")
            self.out.append(f"            raise AttributeError(f\"{name}.{aname} is not "
                            f"selected by {dfield}={{self.{dfield}!r}}\")")
            self.out.append(f"        return self.{vfield}  # type: ignore[no-any-return]")
        self.out.append("")
        self.out.append("")
        branches = [(values, at) for values, _, at in arms]
        # pack
        fn = _Func()
        fn.add(1, f"d = {enc.format('v.' + dfield)}")
        fn.add(1, f"a = v.{vfield}")
        first = True
        for values, at in branches:
            test = f"d == {values[0]}" if len(values) == 1 else f"d in {tuple(values)!r}"
            fn.add(1, f"{'if' if first else 'elif'} {test}:")
            self.union_arm_pack(code, at, fn)
            first = False
        if default is not None:
            if first:
                self.union_arm_pack(code, default[1], fn, ind=1)
            else:
                fn.add(1, "else:")
                self.union_arm_pack(code, default[1], fn)
        else:
            fn.add(1, "else:")
            fn.add(2, f"raise _XdrError(f\"invalid {name} discriminant {{d!r}}\")")
        self.function(f"def pack_{name}(buf: bytearray, v: {cls}) -> None:\n"
                      f"    \"\"\"Append the XDR encoding of a {name} to ``buf``.\"\"\"",
                      fn, name, "encode", [])
        # unpack
        fn = _Func()
        fn.add(1, f"d, = {'_UINT' if code == 'I' else '_INT'}.unpack_from(mv, off)")
        fn.add(1, "off += 4")
        if dec != "{}":
            fn.add(1, f"d = {dec.format('d')}")
        first = True
        for values, at in branches:
            test = f"d == {values[0]}" if len(values) == 1 else f"d in {tuple(values)!r}"
            fn.add(1, f"{'if' if first else 'elif'} {test}:")
            self.emit_unpack(at, "a", fn, 2)
            first = False
        if default is not None:
            if first:
                self.emit_unpack(default[1], "a", fn, 1)
            else:
                fn.add(1, "else:")
                self.emit_unpack(default[1], "a", fn, 2)
        else:
            fn.add(1, "else:")
            fn.add(2, f"raise _XdrError(f\"invalid {name} discriminant {{d!r}}\")")
        self.function(f"def unpack_{name}(mv: memoryview, off: int) -> tuple[{cls}, int]:\n"
                      f"    \"\"\"Decode a {name} at ``off``; return it and the next offset.\"\"\"",
                      fn, name, "decode", [f"    return {cls}(d, a), off"])
        self.codec_functions(name, None, cls)

    def union_arm_pack(self, code: str, at: TypeExpr, fn: _Func, ind: int = 2) -> None:
        if isinstance(self.base(at), Void):
            fn.add(ind, f"buf += {self.struct_var(code)}.pack(d)")
        elif self.flat(at) is not None:
            self.emit_flat_pack([(at, "a")], fn, ind, lead=(code, "d"))
        else:
            fn.add(ind, f"buf += {self.struct_var(code)}.pack(d)")
            self.emit_pack(at, "a", fn, ind)

    # -- programs ---------------------------------------------------------------

    def anon_codec(self, t: TypeExpr, loc: Loc) -> tuple[str, str, str]:
        """(pack, unpack, decode) function names for a procedure argument or result type."""
        t = self.m.resolve_type(t, loc)
        if isinstance(t, Void):
            return "_pack_void", "_unpack_void", "_decode_void"
        if isinstance(t, Ref):
            return f"pack_{t.name}", f"unpack_{t.name}", f"decode_{t.name}"
        if t not in self.anon:
            n = len(self.anon)
            py = self.pytype(t)
            fn = _Func()
            self.emit_pack(t, "v", fn, 1)
            # one codec per type, shared by arguments and results: the messages
            # name the type (the server says whether it was encoding a result)
            what = _spell(t)
            self.function(f"def _pack_t{n}(buf: bytearray, v: {py}) -> None:", fn,
                          what, "encode", [])
            fn = _Func()
            self.emit_unpack(t, "v", fn, 1)
            self.function(f"def _unpack_t{n}(mv: memoryview, off: int) -> tuple[{py}, int]:",
                          fn, what, "decode", ["    return v, off"])
            self.out.append(f"def _decode_t{n}(data: _Any) -> {py}:\n"
                            f"    return _decode_with(_unpack_t{n}, data)\n\n")
            self.anon[t] = (f"_pack_t{n}", f"_unpack_t{n}", f"_decode_t{n}")
        return self.anon[t]

    def args_unpacker(self, args: list[TypeExpr], loc: Loc) -> str:
        key = tuple(self.m.resolve_type(a, loc) for a in args)
        if not key:
            return "_unpack_noargs"
        if key not in self.args_funcs:
            name = f"_args{len(self.args_funcs)}"
            lines = [f"def {name}(mv: memoryview, off: int) -> tuple[tuple[_Any, ...], int]:"]
            if all(self._plain(a) for a in key):
                # plain numbers and fixed opaques: struct's tuple is the arguments
                slots = [s for a in key for s in self.flat(a) or ()]
                var = self.struct_var("".join(s.code for s in slots))
                what = _fstring_text(", ".join(_spell(a) for a in args))
                lines += ["    try:",
                          f"        return {var}.unpack_from(mv, off), "
                          f"off + {sum(s.size for s in slots)}",
                          "    except _StructError as e:",
                          f'        raise _XdrError(f"cannot decode {what}: {{e}}") from None']
            else:
                for i, a in enumerate(args):
                    lines.append(f"    a{i}, off = {self.anon_codec(a, loc)[1]}(mv, off)")
                lines.append(f"    return ({''.join(f'a{i}, ' for i in range(len(args)))}), off")
            self.out += [*lines, "", ""]
            self.args_funcs[key] = name
        return self.args_funcs[key]

    def _plain(self, t: TypeExpr) -> bool:
        """Whether ``t`` decodes to exactly what struct unpacks: a number
        (not a bool or enum, which map their values) or a fixed opaque."""
        t = self.base(t)
        return (isinstance(t, Prim) and t.kind != "bool") or isinstance(t, FOpaque)

    def gen_program(self, p: ProgramDef, taken: set[str]) -> None:
        pnum = self.m.size(p.number, p.loc, "program number")
        self.out.append(f"{p.name} = {pnum}")
        seen_procs: dict[str, int] = {}
        for v in p.versions:
            vnum = self.m.size(v.number, v.loc, "version number")
            self.out.append(f"{v.name} = {vnum}")
            for pr in v.procs:
                num = self.m.size(pr.number, pr.loc, "procedure number")
                if seen_procs.setdefault(pr.name, num) == num and pr.name not in taken:
                    taken.add(pr.name)
                    self.out.append(f"{pr.name} = {num}")
        self.out += ["", ""]
        for v in p.versions:
            self.gen_version(p, pnum, v)

    def gen_version(self, p: ProgramDef, pnum: int, v: VersionDef) -> None:
        vnum = self.m.size(v.number, v.loc, "version number")
        procs = []
        numbers: dict[int, str] = {}
        for pr in v.procs:
            num = self.m.size(pr.number, pr.loc, "procedure number")
            if num in numbers:
                raise XdrgenError(f"{pr.loc}: procedure number {num} used by "
                                  f"{numbers[num]} and {pr.name}")
            numbers[num] = pr.name
            pack_args = [self.anon_codec(a, pr.loc)[0] for a in pr.args]
            rpack, _, rdecode = self.anon_codec(pr.result, pr.loc)
            unpack_args = self.args_unpacker(pr.args, pr.loc)
            procs.append((pr, num, pack_args, rpack, rdecode, unpack_args))
        lines = [f"class {v.name}Client:",
                 f"    \"\"\"Client stub of {p.name} ({pnum}) version {v.name} ({vnum}).",
                 "",
                 "    Every method encodes its arguments and returns what",
                 "    ``caller.call(prog, vers, proc, args, decode)`` returns.",
                 "    \"\"\"",
                 "",
                 "    PROGRAM = " + str(pnum),
                 "    VERSION = " + str(vnum),
                 "    __slots__ = (\"caller\",)",
                 "",
                 "    def __init__(self, caller: _Caller) -> None:",
                 "        self.caller = caller"]
        for pr, num, pack_args, _, rdecode, _ in procs:
            params = "".join(f", a{i}: {self.pytype(self.m.resolve_type(a, pr.loc))}"
                             for i, a in enumerate(pr.args))
            lines += ["", f"    def {pr.name}(self{params}) -> _Any:",
                      f"        \"\"\"Procedure {num}; the result decodes as "
                      f"{self.pytype(self.m.resolve_type(pr.result, pr.loc))}.\"\"\""]
            if pack_args:
                lines.append("        buf = bytearray()")
                lines += [f"        {pk}(buf, a{i})" for i, pk in enumerate(pack_args)]
                args = "bytes(buf)"
            else:
                args = "b\"\""
            lines.append(f"        return self.caller.call({pnum}, {vnum}, {num}, {args}, "
                         f"{rdecode})")
        lines += ["", "", f"class {v.name}Server:",
                  f"    \"\"\"Server skeleton of {p.name} ({pnum}) version {v.name} ({vnum}).",
                  "",
                  "    Override the procedure methods; ``PROCEDURES`` maps each procedure",
                  "    number to its argument decoder, method name and result encoder.",
                  "    \"\"\"",
                  "",
                  "    PROGRAM = " + str(pnum),
                  "    VERSION = " + str(vnum)]
        for pr, num, _, _, _, _ in procs:
            params = "".join(f", a{i}: {self.pytype(self.m.resolve_type(a, pr.loc))}"
                             for i, a in enumerate(pr.args))
            result = self.pytype(self.m.resolve_type(pr.result, pr.loc))
            lines += ["", f"    def {pr.name}(self{params}) -> {result}:",
                      f"        \"\"\"Procedure {num}.\"\"\"",
                      f"        raise NotImplementedError(\"{pr.name}\")"]
        lines += ["", "    PROCEDURES: _ClassVar[dict[int, _Procedure]] = {"]
        for pr, num, _, rpack, _, unpack_args in procs:
            lines.append(f"        {num}: _Procedure(\"{pr.name}\", {unpack_args}, {rpack}),")
        lines += ["    }", "", ""]
        self.out += lines

    # -- module -------------------------------------------------------------------

    def generate(self) -> str:
        aliases = []
        taken = set(self.m.types) | set(self.m.consts)
        for d in self.m.defs:
            if isinstance(d, ConstDef):
                value = d.value.text if isinstance(d.value, StrLit) else \
                    self.m.const(d.value, d.loc)
                self.out.append(f"{_class_name(d.name)} = {value}")
                self.out.append("")
            elif isinstance(d, EnumDef):
                self.gen_enum(d.name)
            elif isinstance(d, StructDef):
                self.gen_struct(d.name)
            elif isinstance(d, UnionDef):
                self.gen_union(d.name)
            elif isinstance(d, TypedefDef):
                t = self.resolved[d.name]
                py = self.pytype(t)  # type: ignore[arg-type]
                self.codec_functions(d.name, t, py)  # type: ignore[arg-type]
                aliases.append(f"{_class_name(d.name)} = {self.alias_expr(t)}")  # type: ignore
        for d in self.m.defs:
            if isinstance(d, ProgramDef):
                self.gen_program(d, taken)
        header = [
            f"\"\"\"XDR types and RPC stubs generated by evpl xdrgen from {self.source_name}.",
            "",
            "Do not edit; regenerate instead.  See evpl.rpc2.xdrgen for the value mapping.",
            "\"\"\"",
            "# ruff: noqa",
            "# mypy: ignore-errors",
            "",
            "from __future__ import annotations",
            "",
            "from dataclasses import dataclass as _dataclass",
            "from enum import IntEnum as _IntEnum",
            "from struct import Struct as _Struct",
            "from typing import Any as _Any, ClassVar as _ClassVar",
            "",
            "from evpl.rpc2.xdr import (",
            "    BOOL_DEC as _BOOL_DEC, BOOL_ENC as _BOOL_ENC, FALSE_BYTES as _FALSE,",
            "    INT as _INT, TRUE_BYTES as _TRUE, UINT as _UINT, Caller as _Caller,",
            "    EnumMap as _EnumMap, Procedure as _Procedure, StructError as _StructError,",
            "    XdrError as _XdrError, check_count as _check_count,",
            "    check_fixed as _check_fixed, decode_void as _decode_void,",
            "    decode_with as _decode_with, pack_fopaque as _pack_fopaque,",
            "    pack_opaque as _pack_opaque, pack_prims as _pack_prims,",
            "    pack_string as _pack_string, pack_void as _pack_void,",
            "    unpack_count as _unpack_count, unpack_fopaque as _unpack_fopaque,",
            "    unpack_fopaque_view as _unpack_fopaque_view, unpack_noargs as _unpack_noargs,",
            "    unpack_opaque as _unpack_opaque, unpack_opaque_view as _unpack_opaque_view,",
            "    unpack_prims as _unpack_prims, unpack_void as _unpack_void,",
            ")",
            "",
        ]
        header += [f"from {mod} import *" for mod in self.imports]
        header += [f"{var} = _Struct({fmt!r})" for fmt, var in self.structs.items()]
        header += ["", ""]
        return "\n".join(header + self.out + aliases) + "\n"

    def alias_expr(self, t: TypeExpr) -> str:
        """A runtime type expression for a typedef alias (emitted after all classes)."""
        if isinstance(t, Ref) and isinstance(self.m.types[t.name], TypedefDef):
            return self.alias_expr(self.resolved[t.name])  # type: ignore[arg-type]
        if isinstance(t, (FArray, VArray)):
            return f"list[{self.alias_expr(t.elem)}]"
        if isinstance(t, Opt):
            ll = self.linked_list_of(self.base(t))
            return f"list[{_class_name(ll)}]" if ll else f"{self.alias_expr(t.elem)} | None"
        return self.pytype(t)


# --------------------------------------------------------------------------
# Public API

def _defines(defines: Mapping[str, str] | None) -> dict[str, str]:
    return {"RPC_HDR": "1"} if defines is None else dict(defines)


def compile_x(source: str, name: str = "<source>", *, include_dirs: Sequence[str] = (),
              defines: Mapping[str, str] | None = None, opaque_views: bool = False,
              imports: Sequence[str] = ()) -> str:
    """Compile ``.x`` source text into the source of a Python module.

    ``name`` is the file name used in error messages and to find relative
    ``#include`` files; ``include_dirs`` are searched after its directory.
    ``defines`` are the preprocessor macros (default: ``RPC_HDR=1``).  With
    ``opaque_views`` variable-length and non-inline fixed opaque data decode
    to ``memoryview`` slices of the input instead of ``bytes`` copies.
    ``imports`` names modules (generated from other ``.x`` files) that define
    the types this file uses without defining; the generated module does
    ``from <module> import *`` for each.
    Raises :class:`XdrgenError` with ``file:line: message`` on bad input.
    """
    pre = _Preprocessor(include_dirs, _defines(defines))
    pre.run(source, name)
    defs = _Parser(pre.tokens, Loc(name, source.count("\n") + 1)).parse()
    model = _Model(defs, pre.c_defines, externs=bool(imports))
    return _Generator(model, os.path.basename(name), opaque_views, imports).generate()


def load_x(path_or_source: str | os.PathLike[str], *, name: str | None = None,
           include_dirs: Sequence[str] = (), defines: Mapping[str, str] | None = None,
           opaque_views: bool = False, imports: Sequence[str] = (),
           register: bool = False) -> types.ModuleType:
    """Compile a ``.x`` file (a path, or source text) and import the result.

    A path is a ``PathLike`` or a one-line string ending in ``.x``.  The module
    is named ``name`` (default: the file's stem, or ``"xdr_module"``); with
    ``register`` it is also put in ``sys.modules`` (needed for pickling).
    """
    if isinstance(path_or_source, os.PathLike) or (
            "\n" not in path_or_source and path_or_source.endswith(".x")):
        filename = os.fspath(path_or_source)
        with open(filename, encoding="utf-8", errors="replace") as f:
            source = f.read()
        default_name = os.path.splitext(os.path.basename(filename))[0]
    else:
        source, filename, default_name = str(path_or_source), "<source>", "xdr_module"
    mod_name = name or default_name
    code = compile_x(source, filename, include_dirs=include_dirs, defines=defines,
                     opaque_views=opaque_views, imports=imports)
    module = types.ModuleType(mod_name)
    module.__file__ = filename
    # dataclasses look the defining module up in sys.modules while building classes
    previous = sys.modules.get(mod_name)
    sys.modules[mod_name] = module
    try:
        exec(compile(code, f"<xdrgen {filename}>", "exec"), module.__dict__)
    finally:
        if not register:
            if previous is None:
                del sys.modules[mod_name]
            else:
                sys.modules[mod_name] = previous
    return module


def main(argv: Sequence[str] | None = None) -> int:
    """``evpl xdrgen``: compile a ``.x`` file to a Python module; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="evpl xdrgen",
        description="Compile an XDR/RPC language (.x) file into a Python module with "
                    "dataclasses, IntEnums, pack_/unpack_/encode_/decode_ functions, "
                    "client stubs and server skeletons for evpl.rpc2.",
        epilog="example: evpl xdrgen /usr/include/rpcsvc/mount.x -o mount_xdr.py")
    parser.add_argument("file", help="the .x file to compile")
    parser.add_argument("-o", "--output", help="write the module here (default: stdout)")
    parser.add_argument("-I", dest="include_dirs", action="append", default=[],
                        metavar="DIR", help="also search DIR for #include files")
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        metavar="NAME[=VALUE]",
                        help="define a preprocessor macro (RPC_HDR is defined unless -U)")
    parser.add_argument("-U", dest="undefines", action="append", default=[],
                        metavar="NAME", help="undefine a preprocessor macro")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="take types this file uses but does not define from MODULE")
    parser.add_argument("--opaque-views", action="store_true",
                        help="decode opaque data as memoryview slices (no copy)")
    args = parser.parse_args(argv)
    defines = _defines(None)
    for d in args.defines:
        key, _, value = d.partition("=")
        defines[key] = value or "1"
    for u in args.undefines:
        defines.pop(u, None)
    try:
        with open(args.file, encoding="utf-8", errors="replace") as f:
            source = f.read()
        code = compile_x(source, args.file, include_dirs=args.include_dirs,
                         defines=defines, opaque_views=args.opaque_views,
                         imports=args.imports)
    except (OSError, XdrgenError) as e:
        print(f"evpl xdrgen: {e}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(code)
    else:
        sys.stdout.write(code)
    return 0

