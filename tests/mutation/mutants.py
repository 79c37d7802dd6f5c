"""AST-located, text-applied mutants of one Python file (the operators of tests/mutation/run.py).

Each mutant replaces one byte range of the source (located through the AST node's positions, so
formatting and comments elsewhere stay as they are) and must still compile. Operators:

    binop        + <-> -, * <-> /, // -> *, % -> //, ** -> *, << <-> >>, & <-> |   (also in a += b)
    compare      < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in
    boolop       and <-> or;   not x -> x;   -x -> x;   if c -> if not (c) (c not a comparison)
    constant     int n -> n + 1, float x -> x + 1.0, True <-> False
    call         drop a statement call (-> pass); drop one keyword argument; swap the first two
                 positional arguments; x.detach()/.clone()/.contiguous() -> x;
                 .mean <-> .sum, min <-> max, ones_like <-> zeros_like, l1_loss <-> mse_loss
    grad         `with torch.no_grad():` -> `if True:`; drop an @torch.no_grad() decorator

Not mutated (out of scope, listed in the report): strings, docstrings, type annotations, logging and
print calls, `raise` statements (error messages and the checks that only raise), asserts, Triton
autotune tables (triton.Config, num_warps, num_stages: GPU performance knobs the interpreter ignores),
dtype casts (.float(), .double(): on the fp32 CPU path they change rounding only; the bf16 tests
bound precision separately).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

BINOP_SWAP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
              ast.FloorDiv: ("//", "*"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"),
              ast.LShift: ("<<", ">>"), ast.RShift: (">>", "<<"), ast.BitAnd: ("&", "|"), ast.BitOr: ("|", "&")}
CMP_SWAP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
            ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"),
            ast.IsNot: ("is not", "is"), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}
STRIP_METHODS = {"detach", "clone", "contiguous"}  # not .float()/.double(): precision, not semantics, on fp32
NAME_SWAP = {"mean": "sum", "sum": "mean", "min": "max", "max": "min", "minimum": "maximum",
             "maximum": "minimum", "ones_like": "zeros_like", "zeros_like": "ones_like",
             "l1_loss": "mse_loss", "mse_loss": "l1_loss"}
QUIET_CALLS = {"info", "warning", "debug", "error", "exception", "print", "warn", "write_text", "setdefault"}
NO_SWAP_CALLS = {"max", "min", "isinstance", "hasattr", "getattr", "setattr", "print", "dict", "zip"}
TUNING_KWARGS = {"num_warps", "num_stages"}
GRAD_CONTEXTS = {"no_grad", "inference_mode"}


@dataclass
class Mutant:
    path: str           # file, relative to the repository root
    line: int
    end_line: int
    op: str             # operator family
    original: str       # the replaced text
    replacement: str
    start: int          # byte offsets into the file
    end: int
    scope: tuple[int, int] = (0, 0)  # lines of the innermost enclosing function (0, 0: module level)

    @property
    def key(self) -> str:
        return f"{self.path}:{self.start}:{self.end}:{self.replacement}"

    def apply(self, source: bytes) -> bytes:
        return source[:self.start] + self.replacement.encode() + source[self.end:]

    @property
    def label(self) -> str:
        orig = " ".join(self.original.split())[:60]
        return f"{self.path}:{self.line} {self.op}: `{orig}` -> `{' '.join(self.replacement.split())[:60]}`"


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


class _Finder(ast.NodeVisitor):
    def __init__(self, path: str, source: bytes):
        self.path, self.source = path, source
        self.line_starts = [0]
        for i, b in enumerate(source):
            if b == 0x0A:
                self.line_starts.append(i + 1)
        self.found: list[Mutant] = []
        self.scopes: list[tuple[int, int]] = [(0, 0)]

    # --- positions ------------------------------------------------------------------------------
    def off(self, line: int, col: int) -> int:
        return self.line_starts[line - 1] + col

    def span(self, node) -> tuple[int, int]:
        return self.off(node.lineno, node.col_offset), self.off(node.end_lineno, node.end_col_offset)

    def text(self, start: int, end: int) -> str:
        return self.source[start:end].decode()

    def add(self, node, op: str, start: int, end: int, replacement: str) -> None:
        self.found.append(Mutant(self.path, node.lineno, getattr(node, "end_lineno", node.lineno), op,
                                 self.text(start, end), replacement, start, end, self.scopes[-1]))

    def replace_in_gap(self, node, op: str, left, right, old: str, new: str) -> None:
        """Replace the operator token between two operand nodes (the gap holds only it, blanks, parens)."""
        start, end = self.off(left.end_lineno, left.end_col_offset), self.off(right.lineno, right.col_offset)
        gap = self.text(start, end)
        pos = gap.find(old)
        if pos < 0:
            return
        self.add(node, op, start, end, gap[:pos] + new + gap[pos + len(old):])

    # --- what is never mutated ----------------------------------------------------------------------
    def visit_Raise(self, node):
        pass

    def visit_Assert(self, node):
        pass

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node):
        pass

    def visit_JoinedStr(self, node):
        pass

    def visit_FunctionDef(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]  # the docstring
        for dec in node.decorator_list:
            self.decorator(dec)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        self.scopes.append((node.lineno, node.end_lineno))
        for stmt in body:
            self.visit(stmt)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def decorator(self, dec) -> None:
        if isinstance(dec, ast.Call) and _call_name(dec) in GRAD_CONTEXTS:
            start, end = self.span(dec)
            self.add(dec, "grad", start - 1, end, "")  # the '@' too
        # other decorators (triton.jit, autotune, custom_op registration) are left alone

    def visit_Call(self, node):
        name = _call_name(node)
        if name in QUIET_CALLS or name == "Config":  # logging; triton.Config tuning tables
            return
        # method strips and name swaps
        if isinstance(node.func, ast.Attribute):
            if name in STRIP_METHODS and not node.args and not node.keywords:
                start, end = self.span(node)
                self.add(node, "call", start, end, self.text(*self.span(node.func.value)))
            if name in NAME_SWAP:
                end = self.off(node.func.end_lineno, node.func.end_col_offset)
                self.add(node, "call", end - len(name), end, NAME_SWAP[name])
        elif isinstance(node.func, ast.Name) and name in NAME_SWAP:
            start, end = self.span(node.func)
            self.add(node, "call", start, end, NAME_SWAP[name])
        # positional swap
        pos = [a for a in node.args if not isinstance(a, ast.Starred)]
        if len(pos) >= 2 and len(pos) == len(node.args) and name not in NO_SWAP_CALLS:
            a, b = pos[0], pos[1]
            ta, tb = self.text(*self.span(a)), self.text(*self.span(b))
            if ta != tb:
                start, end = self.off(a.lineno, a.col_offset), self.off(b.end_lineno, b.end_col_offset)
                middle = self.text(self.off(a.end_lineno, a.end_col_offset), self.off(b.lineno, b.col_offset))
                self.add(node, "call", start, end, tb + middle + ta)
        # keyword drops
        args = sorted(list(node.args) + [k for k in node.keywords if k.arg is not None],
                      key=lambda n: (n.lineno, n.col_offset))
        for i, kw in enumerate(args):
            if not isinstance(kw, ast.keyword) or kw.arg in TUNING_KWARGS:
                continue
            if i > 0:
                prev = args[i - 1]
                start, end = self.off(prev.end_lineno, prev.end_col_offset), self.span(kw)[1]
            elif i + 1 < len(args):
                start, end = self.span(kw)[0], self.off(args[i + 1].lineno, args[i + 1].col_offset)
            else:
                start, end = self.span(kw)
            self.add(kw, "kwarg", start, end, "")
        self.generic_visit(node)

    def visit_keyword(self, node):
        if node.arg not in TUNING_KWARGS:
            self.visit(node.value)

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Call):
            if _call_name(node.value) not in QUIET_CALLS:
                self.add(node, "drop", *self.span(node), "pass")
        elif isinstance(node.value, ast.Constant):
            return  # a bare string (docstring-like)
        self.visit(node.value)

    def visit_With(self, node):
        item = node.items[0].context_expr
        if len(node.items) == 1 and isinstance(item, ast.Call) and _call_name(item) in GRAD_CONTEXTS:
            start = self.off(node.lineno, node.col_offset)
            self.add(node, "grad", start, self.span(item)[1], "if True")
        self.generic_visit(node)

    # --- operators --------------------------------------------------------------------------------
    def visit_BinOp(self, node):
        swap = BINOP_SWAP.get(type(node.op))
        if swap:
            self.replace_in_gap(node, "binop", node.left, node.right, *swap)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        swap = BINOP_SWAP.get(type(node.op))
        if swap:
            self.replace_in_gap(node, "binop", node.target, node.value, swap[0] + "=", swap[1] + "=")
        self.visit(node.value)

    def visit_Compare(self, node):
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            swap = CMP_SWAP.get(type(op))
            if swap:
                self.replace_in_gap(node, "compare", left, right, *swap)
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        for left, right in zip(node.values, node.values[1:]):
            self.replace_in_gap(node, "boolop", left, right, old, new)
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.Not, ast.USub)):
            start, end = self.span(node)
            self.add(node, "boolop" if isinstance(node.op, ast.Not) else "binop", start, end,
                     self.text(*self.span(node.operand)))
        self.generic_visit(node)

    def negate_test(self, node) -> None:
        test = node.test
        if not isinstance(test, (ast.Compare, ast.BoolOp, ast.UnaryOp)):
            start, end = self.span(test)
            self.add(test, "boolop", start, end, f"not ({self.text(start, end)})")

    def visit_If(self, node):
        self.negate_test(node)
        self.generic_visit(node)

    def visit_IfExp(self, node):
        self.negate_test(node)
        self.generic_visit(node)

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            new = "False" if v else "True"
        elif isinstance(v, int):
            new = repr(v + 1)
        elif isinstance(v, float):
            new = repr(v + 1.0)
        else:
            return
        self.add(node, "constant", *self.span(node), new)


def find_mutants(path: str, source: bytes) -> list[Mutant]:
    """Every mutant of `source` (the file at `path`) that still compiles, in file order."""
    finder = _Finder(path, source)
    tree = ast.parse(source)
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # module docstring
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets):
            continue
        finder.visit(stmt)
    out, seen = [], set()
    for m in sorted(finder.found, key=lambda m: (m.start, m.end, m.replacement)):
        key = (m.start, m.end, m.replacement)
        if key in seen or m.original == m.replacement:
            continue
        seen.add(key)
        try:
            compile(m.apply(source), path, "exec")
        except SyntaxError:
            continue
        out.append(m)
    return out
