"""The body of a compiled batch (expressions.compile_batch): one function that evaluates a
group's conditions for one target, written the way one would write it by hand.

A group's conditions repeat themselves: a firm's warning and its limit share a drawdown floor
and a size tier (`min(account.peak - tier(account.size, ...), ...)` in both), every condition
reads `account` from the environment again, and a flat-by warning asks `minutes_until("16:59")`
of every account although the answer is the same for all of them. Given the conditions and
their bits, this module
* folds what the params made constant (`"intraday" == "intraday"`, `0.0 > 0 and ...`,
  `x if True else y`): a condition that folds to false is dropped from the batch;
* works out the parts that depend on the clock alone (`minutes_until("16:59") <= 5`,
  `time_between(...)`) once for each time the batch sees, not once per target;
* computes a repeated subexpression once, before the conditions, when evaluating it cannot
  fail (reads of record fields, numbers added, compared, chosen, min/max of them) and it is
  evaluated anyway (not only behind an `and`);
* reads each environment name used more than once (`account`, `leader`, ...) into a local;
  and
* sets each bit with an `if` (`if <condition>: mask |= 8`), so a false condition costs its
  test alone, and a condition counts by its truth, as when the engine evaluates it alone.

The batch gives the same mask as the conditions one by one. Values cannot differ: what is
computed early or once per time is a pure function of the environment (of its clock), which a
batch does not change. Only failures could move: a part computed early that raises (none of
the kinds above should) makes the whole batch raise, and the engine then evaluates the group's
conditions one by one (`Engine._one_by_one`), whose answers and errors are the exact ones, so
an early computation can cost time, never a decision. tests/test_batching.py holds batches of
the shipped rules to their conditions one by one.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

# Environment names whose value is a plain record (a view built with every field set): reading
# one of its fields cannot fail. A position's `opened_at` may be None, so comparing or
# subtracting it may fail: never computed early.
_RECORDS = frozenset({"account", "leader_account", "leader", "follower", "pair", "instrument",
                      "accounts"})
_PLAIN = frozenset({"now", "now_local", "weekday"})  # always set, never fails
_NULLABLE_FIELDS = frozenset({"opened_at"})
_SAFE_CALLS = frozenset({"__cl_fn_min", "__cl_fn_max", "__cl_abs", "__cl_fn_abs"})
_SAFE_BINOPS = (ast.Add, ast.Sub, ast.Mult)  # plain only where the checker proved numbers
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_TIER = "__cl_tier"  # expressions._tier_chain's locals
MAX_SHARED = 64  # subexpressions computed early, at most
MAX_NODES = 20_000  # a larger batch is not searched for repeats (compiling stays quick)


def _constant(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant)


class _Folder(ast.NodeTransformer):
    """Fold comparisons, `not`, conditionals and `and`/`or` whose deciding parts are constants
    (the params, folded at load), exactly as Python would evaluate them."""

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        operands = [node.left, *node.comparators]
        if not all(_constant(o) for o in operands):
            return node
        values = [o.value for o in operands]  # type: ignore[attr-defined]
        result: Any = True
        try:
            for op, left, right in zip(node.ops, values, values[1:], strict=False):
                result = _COMPARE[type(op)](left, right)
                if not result:
                    break
        except (KeyError, TypeError):  # `in`, or an ordering Python refuses: left alone
            return node
        return ast.copy_location(ast.Constant(value=result), node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and _constant(node.operand):
            return ast.copy_location(
                ast.Constant(value=not node.operand.value), node)  # type: ignore[attr-defined]
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        if _constant(node.test):
            return node.body if node.test.value else node.orelse  # type: ignore[attr-defined]
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        deciding = isinstance(node.op, ast.Or)  # `or` stops at a true value, `and` at a false
        values = list(node.values)
        while len(values) > 1 and _constant(values[0]):
            if bool(values[0].value) is deciding:  # type: ignore[attr-defined]
                return values[0]  # the result, whatever follows
            values.pop(0)  # decides nothing: the next value is evaluated
        if len(values) == 1:
            return values[0]
        node.values = values
        return node


def fold(tree: ast.expr) -> ast.expr:
    """A copy of `tree` with its constant parts folded (the tree itself is left as it is)."""
    folded: ast.expr = _Folder().visit(_copy_with_names(tree, {}, {}))
    return folded


def _env_slot(node: ast.AST, env: str) -> str | None:
    """`account` for `<env>.account`, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            node.value.id == env:
        return node.attr
    return None


def _constant_key(value: Any) -> tuple[Any, ...]:
    """A constant as a key: its type and value, a float by its repr (-0.0 is not 0.0; every
    NaN alike), never an int's repr (which fails beyond 4,300 digits)."""
    return (type(value), repr(value) if isinstance(value, float) else value)


def _shape(node: ast.AST) -> tuple[Any, ...]:
    """A small tree's structure as a key: equal keys, equal trees."""
    if isinstance(node, ast.Constant):
        return (ast.Constant, _constant_key(node.value))
    parts: list[Any] = [type(node)]
    for name in node._fields:
        value = getattr(node, name, None)
        if isinstance(value, ast.AST):
            parts.append(_shape(value))
        elif isinstance(value, list):
            parts.append(tuple(_shape(v) if isinstance(v, ast.AST) else v for v in value))
        else:
            parts.append(value)
    return tuple(parts)


def _canonical_tiers(tree: ast.expr) -> None:
    """Name each inline tier's local after the value it holds (two tiers of `account.size`
    share one name), so that two equal tiers are equal trees. Safe: each tier assigns its local
    before reading it, and every assignment of one name stores the same value."""
    names: dict[str, str] = {}
    by_value: dict[tuple[Any, ...], str] = {}
    locals_: list[ast.Name] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id.startswith(_TIER):
            locals_.append(node)
        elif isinstance(node, ast.NamedExpr) and node.target.id.startswith(_TIER):
            key = _shape(node.value)
            names[node.target.id] = by_value.setdefault(key, f"{_TIER}_{len(by_value)}")
    for node in locals_:
        node.id = names.get(node.id, node.id)


class _Facts:
    """For each node of a tree: whether evaluating it cannot fail, its size, and its structure
    as a number (equal numbers: equal trees; a constant counts by its type and value, a float
    by its repr, so 1, 1.0 and True differ, and so do -0.0 and 0.0). One walk of the tree."""

    def __init__(self, tree: ast.AST, env: str) -> None:
        self.env = env
        self._ok: dict[int, bool] = {}  # no part of it can fail
        self._reads_env: dict[int, bool] = {}
        self.safe: dict[int, bool] = {}  # and it can be computed apart
        self.size: dict[int, int] = {}
        self.key: dict[int, int] = {}
        self._shapes: dict[tuple[Any, ...], int] = {}
        self._visit(tree)

    def _visit(self, node: ast.AST) -> tuple[set[str], set[str]]:
        """(tier locals read, tier locals assigned) inside `node`."""
        reads: set[str] = set()
        assigns: set[str] = set()
        children_safe = True
        reads_env = isinstance(node, ast.Name) and node.id == self.env
        size = 1
        shape: list[Any] = [type(node)]
        children: list[ast.AST] = []
        if isinstance(node, ast.Constant):
            shape.append(_constant_key(node.value))
        else:  # names, attributes: the text; children below
            for name in node._fields:
                value = getattr(node, name, None)
                if isinstance(value, ast.AST):
                    children.append(value)
                elif isinstance(value, list):
                    children += [v for v in value if isinstance(v, ast.AST)]
                else:
                    shape.append(value)
        for child in children:
            r, a = self._visit(child)
            shape.append(self.key[id(child)])
            reads |= r
            assigns |= a
            children_safe = children_safe and self._ok.get(id(child), True)
            reads_env = reads_env or self._reads_env.get(id(child), False)
            size += self.size[id(child)]
        self.key[id(node)] = self._shapes.setdefault(tuple(shape), len(self._shapes))
        self.size[id(node)] = size
        self._reads_env[id(node)] = reads_env
        if isinstance(node, ast.Name) and node.id.startswith(_TIER):
            (assigns if isinstance(node.ctx, ast.Store) else reads).add(node.id)
        if isinstance(node, ast.Attribute):  # its own rule: the env is read only this way
            self._ok[id(node)] = self._safe_read(node)
        elif isinstance(node, ast.expr):
            self._ok[id(node)] = children_safe and self._safe_itself(node)
        if isinstance(node, ast.expr):
            # and computed on its own, each tier local it reads is one it assigns
            self.safe[id(node)] = self._ok[id(node)] and reads <= assigns
        return reads, assigns

    def _safe_read(self, node: ast.Attribute) -> bool:
        """`<env>.account`, `<env>.account.size`, `<env>.now_local`: yes; `<env>.quote.last`
        (a missing price fails), `<env>.leader.opened_at` (may be None), params: no."""
        slot = _env_slot(node.value, self.env)
        if slot is not None:
            return slot in _RECORDS and node.attr not in _NULLABLE_FIELDS
        slot = _env_slot(node, self.env)
        return slot in _RECORDS or slot in _PLAIN

    def _safe_itself(self, node: ast.expr) -> bool:
        env = self.env
        match node:
            case ast.Constant():
                return True
            case ast.Name(id=name):
                return name != env  # a constant, a tier local; the env only through a field
            case ast.UnaryOp(op=ast.Not() | ast.USub() | ast.UAdd()):
                return True
            case ast.BinOp(op=op):
                return isinstance(op, _SAFE_BINOPS)
            case ast.Compare(ops=ops):
                return all(type(op) in _COMPARE for op in ops)
            case ast.BoolOp() | ast.IfExp() | ast.NamedExpr():
                return True
            case ast.Call(func=ast.Name(id=name), keywords=[]):
                return name in _SAFE_CALLS
        return False

    def worth_sharing(self, node: ast.expr) -> bool:
        """Safe, reads the environment (constants CPython folds itself), and is more than
        one read of it (`account`, `account.size`: reading a local instead saves nothing)."""
        return self.safe[id(node)] and self._reads_env[id(node)] and \
            not isinstance(node, ast.Attribute | ast.Name)


def _always_evaluated(trees: list[ast.expr]) -> set[int]:
    """The ids of the nodes of `trees` that every evaluation reaches: not behind an `and` /
    `or` (a value after the first), a conditional's branch, or a chained comparison's later
    operand. Computing such a node early costs nothing it did not cost already."""
    always: set[int] = set()
    todo: list[ast.AST] = list(trees)
    while todo:
        node = todo.pop()
        always.add(id(node))
        guarded = _guarded_children(node)
        todo.extend(child for child in ast.iter_child_nodes(node) if id(child) not in guarded)
    return always


def _guarded_children(node: ast.AST) -> set[int]:
    """The ids of the children of `node` that its evaluation may skip."""
    match node:
        case ast.BoolOp(values=values):
            return {id(v) for v in values[1:]}
        case ast.IfExp(body=body, orelse=orelse):
            return {id(body), id(orelse)}
        case ast.Compare(comparators=comparators):
            return {id(c) for c in comparators[1:]}
    return set()


def _copy_with_names(node: ast.AST, names: dict[int, str], keys: dict[int, int],
                     root: bool = False) -> Any:
    """A copy of `node` in which each part of a shape in `names` (but the root) reads that
    local instead. The tree itself is left as it is. (Written out: copy.deepcopy of a batch's
    trees took a third of compiling it.)"""
    if not root and names:
        name = names.get(keys.get(id(node), -1))
        if name is not None:
            return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)
    if isinstance(node, ast.expr_context | ast.operator | ast.cmpop | ast.unaryop | ast.boolop):
        return node  # never changed: shared
    fields = {}
    for field in node._fields:
        value = getattr(node, field, None)
        if isinstance(value, ast.AST):
            value = _copy_with_names(value, names, keys)
        elif isinstance(value, list):
            value = [_copy_with_names(v, names, keys) if isinstance(v, ast.AST) else v
                     for v in value]
        fields[field] = value
    # made with its fields: a node made empty and filled in after is deprecated from Python
    # 3.13 (a DeprecationWarning for each missing field) and an error from 3.15
    new = node.__class__(**fields)
    for attribute in node._attributes:
        if hasattr(node, attribute):
            setattr(new, attribute, getattr(node, attribute))
    return new


def _share_repeats(tree: ast.expr, env: str) -> tuple[ast.expr, list[tuple[str, ast.expr]]]:
    """Repeated safe subexpressions of `tree` computed once: the tree with each repeat reading
    a local, and the locals' assignments in the order they must run (a part first, then what
    contains it).

    Largest first: a subexpression is shared when, counting only the places that remain (not
    inside another occurrence of one shared already; inside the one that is computed, once),
    it still occurs twice, and one of those places is evaluated on every path (from the tree's
    root, or from the shared expression it lies in)."""
    facts = _Facts(tree, env)
    parent: dict[int, ast.AST] = {}
    guarded: set[int] = set()  # nodes their parent's evaluation may skip
    occurrences: dict[int, list[ast.expr]] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parent[id(child)] = node
        guarded |= _guarded_children(node)
        if isinstance(node, ast.expr) and facts.worth_sharing(node):
            occurrences.setdefault(facts.key[id(node)], []).append(node)
    candidates = sorted((key for key, nodes in occurrences.items() if len(nodes) > 1),
                        key=lambda key: (-facts.size[id(occurrences[key][0])], key))
    computed: set[int] = set()  # the occurrence whose copy is a shared value (one per shape)
    replaced: set[int] = set()  # the other occurrences of a shared shape: gone from the tree

    def place(node: ast.AST) -> tuple[bool, bool]:
        """(remains, evaluated on every path) of one occurrence."""
        always = True
        current = node
        while id(current) not in computed and id(current) in parent:
            if id(current) in guarded:
                always = False
            current = parent[id(current)]
            if id(current) in replaced:
                return False, False
        return True, always

    names: dict[int, str] = {}
    shared: list[tuple[str, ast.expr]] = []
    for key in candidates:
        if len(names) >= MAX_SHARED:
            break
        remaining = []
        reached = False
        for node in occurrences[key]:
            remains, always = place(node)
            if remains:
                remaining.append(node)
                reached = reached or always
        if len(remaining) < 2 or not reached:
            continue
        names[key] = f"__cl_c{len(names)}"
        shared.append((names[key], remaining[0]))
        computed.add(id(remaining[0]))
        replaced.update(id(node) for node in remaining[1:])
    shared.sort(key=lambda item: facts.size[id(item[1])])  # a part before what contains it
    return (_copy_with_names(tree, names, facts.key),
            [(name, _copy_with_names(node, names, facts.key, root=True))
             for name, node in shared])


class _ReadSlots(ast.NodeTransformer):
    def __init__(self, env: str, slots: set[str]) -> None:
        self.env, self.slots = env, slots

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        slot = _env_slot(node, self.env)
        if slot in self.slots:
            return ast.copy_location(ast.Name(id=f"__cl_s_{slot}", ctx=ast.Load()), node)
        return self.generic_visit(node)


_CLOCK = ("now_local", "weekday")  # the same for every target of a group in one tick
_CLOCK_CALLS = frozenset({"__cl_minutes_until"})  # (env, a time constant): reads now_local


class _ClockParts:
    """The parts of the conditions that depend on the clock alone (`now_local`, `weekday`,
    `minutes_until("16:59")`, `time_between(...)` as compiled): the same for every target of a
    group in one tick. Each largest such part that reads the clock becomes a value the batch
    works out once for each new time (`__cl_t0`, ...)."""

    def __init__(self, env: str) -> None:
        self.env = env
        self.values: dict[tuple[Any, ...], tuple[str, ast.expr]] = {}  # shape -> (name, part)
        self.reads: set[str] = set()  # the clock's names they read

    def _clock_only(self, node: ast.AST) -> tuple[bool, bool]:
        """(depends on the clock and constants alone, reads the clock)."""
        env = self.env
        match node:
            case ast.Constant():
                return True, False
            case ast.Name(id=name):
                return name.startswith("__cl_k"), False  # a time constant (expressions.py)
            case ast.Attribute():
                slot = _env_slot(node, env)
                return slot in _CLOCK, slot in _CLOCK
            case ast.Call(func=ast.Name(id=name), args=[ast.Name(id=first), ast.Name(id=k)],
                          keywords=[]):
                only = name in _CLOCK_CALLS and first == env and k.startswith("__cl_k")
                return only, only
            case ast.Compare(ops=ops) if all(type(op) in _COMPARE for op in ops):
                pass
            case ast.BoolOp() | ast.IfExp() | ast.UnaryOp(op=ast.Not()):
                pass
            case _:
                return False, False
        reads = False
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr_context | ast.cmpop | ast.boolop | ast.unaryop):
                continue
            only, read = self._clock_only(child)
            if not only:
                return False, False
            reads = reads or read
        return True, reads

    def take(self, node: ast.expr) -> ast.expr:
        """`node` with each largest clock-only part that reads the clock read from its value
        instead (a copy where something changed)."""
        only, reads = self._clock_only(node)
        if only:
            if not reads or isinstance(node, ast.Attribute):
                return node  # a constant, or the clock itself: nothing to save
            text = _shape(node)
            if text not in self.values:
                self.values[text] = (f"__cl_t{len(self.values)}", node)
                for part in ast.walk(node):
                    if isinstance(part, ast.Call):  # minutes_until reads now_local
                        self.reads.add("now_local")
                    elif (slot := _env_slot(part, self.env)) is not None:
                        self.reads.add(slot)
            return ast.copy_location(ast.Name(id=self.values[text][0], ctx=ast.Load()), node)
        for field, value in ast.iter_fields(node):
            if isinstance(value, ast.expr):
                setattr(node, field, self.take(value))
            elif isinstance(value, list):
                setattr(node, field, [self.take(v) if isinstance(v, ast.expr) else v
                                      for v in value])
        return node

    def statements(self) -> list[ast.stmt]:
        """`global ...; if <env>.now_local is not __cl_clock_now_local ...: <work them out>`.

        The values are stored before the mark of their time, so a call that fails midway
        leaves the old mark and the next call works them out again. A batch belongs to one
        engine, whose ticks never overlap: shared by threads calling it at once, it would need
        a lock (one thread could read another time's values under its mark)."""
        if not self.values:
            return []
        env = ast.Name(id=self.env, ctx=ast.Load())
        marks = {read: f"__cl_clock_{read}" for read in sorted(self.reads)}
        names = [name for name, _ in self.values.values()]
        test = ast.BoolOp(op=ast.Or(), values=[
            ast.Compare(left=ast.Attribute(value=env, attr=read, ctx=ast.Load()),
                        ops=[ast.IsNot()], comparators=[ast.Name(id=mark, ctx=ast.Load())])
            for read, mark in marks.items()])
        body: list[ast.stmt] = [
            *(ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=value)
              for name, value in self.values.values()),
            *(ast.Assign(targets=[ast.Name(id=mark, ctx=ast.Store())],
                         value=ast.Attribute(value=env, attr=read, ctx=ast.Load()))
              for read, mark in marks.items()),
        ]
        return [ast.Global(names=[*names, *marks.values()]),
                ast.If(test=test if len(test.values) > 1 else test.values[0], body=body,
                       orelse=[])]

    def initial(self) -> dict[str, Any]:
        """The batch's globals before its first call: no time marked yet."""
        return {f"__cl_clock_{read}": _NOT_YET for read in self.reads}


_NOT_YET = object()  # no time seen yet: never `is` a time


def batch_function(conditions: list[tuple[int, ast.expr]], env: str,
                   label: str) -> tuple[ast.Module, dict[str, Any]]:
    """The batch of (bit, folded condition) pairs, and the globals it starts with, as

        def __cl_batch(<env>):
            <the clock's parts, worked out again when the time changed>
            <environment names read once>
            <repeats computed once>
            mask = 0
            if <condition>: mask |= <bit>
            ...
            return mask

    so a false condition costs its test alone (no shift, no `|`), and a condition counts by
    its truth, as when the engine evaluates it on its own. See the module's doc."""
    clock = _ClockParts(env)
    holder = ast.Tuple(elts=[clock.take(tree) for _, tree in conditions], ctx=ast.Load())
    shared: list[tuple[str, ast.expr]] = []
    if sum(1 for _ in ast.walk(holder)) <= MAX_NODES:
        _canonical_tiers(holder)
        shared_holder, shared = _share_repeats(holder, env)
        assert isinstance(shared_holder, ast.Tuple)
        holder = shared_holder
    trees: list[ast.expr] = holder.elts
    statements = [*trees, *(value for _, value in shared)]
    always = _always_evaluated(statements)
    uses: dict[str, int] = {}
    reached: set[str] = set()
    for tree in statements:
        for node in ast.walk(tree):
            slot = _env_slot(node, env)
            if slot is not None:
                uses[slot] = uses.get(slot, 0) + 1
                if id(node) in always:
                    reached.add(slot)
    slots = {slot for slot, count in uses.items() if count > 1 and slot in reached}
    read = _ReadSlots(env, slots)
    mask = "__cl_mask"
    code: list[ast.stmt] = [
        *clock.statements(),
        *(ast.Assign(targets=[ast.Name(id=f"__cl_s_{slot}", ctx=ast.Store())],
                     value=ast.Attribute(value=ast.Name(id=env, ctx=ast.Load()), attr=slot,
                                         ctx=ast.Load()))
          for slot in sorted(slots)),
        *(ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=read.visit(value))
          for name, value in shared),
        ast.Assign(targets=[ast.Name(id=mask, ctx=ast.Store())], value=ast.Constant(value=0)),
        *(ast.If(test=read.visit(tree),
                 body=[ast.AugAssign(target=ast.Name(id=mask, ctx=ast.Store()), op=ast.BitOr(),
                                     value=ast.Constant(value=bit))],
                 orelse=[])
          for (bit, _), tree in zip(conditions, trees, strict=True)),
        ast.Return(value=ast.Name(id=mask, ctx=ast.Load())),
    ]
    module = ast.parse(f"def __cl_batch({env}):\n    return 0", filename=f"<{label}>")
    function = module.body[0]
    assert isinstance(function, ast.FunctionDef)
    function.body = code
    ast.fix_missing_locations(module)
    return module, clock.initial()
