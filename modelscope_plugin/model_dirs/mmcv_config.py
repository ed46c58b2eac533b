"""Reads the values of an mmcv Python config (``config.py`` / ``mmcv_config.py``) without executing it.

Top-level assignments are evaluated with a small literal evaluator: constants, names assigned earlier,
``dict(...)``, list/tuple/dict/set displays, arithmetic and subscripts. Anything else (imports, calls,
comprehensions) is skipped; the names it would have bound are simply absent.
"""
import ast
import operator
from pathlib import Path
from typing import Any, Dict

_BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                     ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class _Unsupported(Exception):
    pass


def _evaluate(node: ast.AST, names: Dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise _Unsupported(node.id)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        values = [_evaluate(element, names) for element in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.Dict):
        result = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # {**other}
                result.update(_evaluate(value, names))
            else:
                result[_evaluate(key, names)] = _evaluate(value, names)
        return result
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        result = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                result.update(_evaluate(keyword.value, names))
            else:
                result[keyword.arg] = _evaluate(keyword.value, names)
        return result
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        return _BINARY_OPERATORS[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, names)
    if isinstance(node, ast.Subscript):
        return _evaluate(node.value, names)[_evaluate(node.slice, names)]
    raise _Unsupported(type(node).__name__)


def read_mmcv_config(path) -> Dict[str, Any]:
    """Names bound by the config's top-level assignments that the evaluator could compute."""
    source = Path(path).read_text(encoding="utf-8")
    names: Dict[str, Any] = {}
    for statement in ast.parse(source, filename=str(path)).body:
        if isinstance(statement, ast.Assign) and all(isinstance(target, ast.Name) for target in statement.targets):
            try:
                value = _evaluate(statement.value, names)
            except (_Unsupported, KeyError, IndexError, TypeError, ZeroDivisionError):
                continue
            for target in statement.targets:
                names[target.id] = value
    return names
