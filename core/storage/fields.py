"""Reading a manifest's JSON object field by field: each of its type, or a CacheFileError naming the field."""

from core.errors import CacheFileError

NONE = type(None)


def checked(value, types: tuple[type, ...], where: str):
    """`value` if it is one of `types` (a bool is never an int), else a CacheFileError naming `where`."""
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return value
    expected = " or ".join(t.__name__ for t in types)
    raise CacheFileError(f"{where} should be {expected}, not {type(value).__name__}")


class Fields:
    """One JSON object of the manifest, `where` naming it in errors ("manifest.model")."""

    def __init__(self, value, where: str):
        if not isinstance(value, dict):
            raise CacheFileError(f"{where} should be an object")
        self.value = value
        self.where = where

    def present(self, key: str):
        if key not in self.value:
            raise CacheFileError(f"{self.where}.{key} is missing")
        return self.value[key]

    def get(self, key: str, *types: type):
        """The field `key`, of one of `types`."""
        return checked(self.present(key), types, f"{self.where}.{key}")

    def object(self, key: str) -> "Fields":
        """The field `key`, an object."""
        return Fields(self.present(key), f"{self.where}.{key}")

    def objects(self, key: str) -> list["Fields"]:
        """The field `key`, a list of objects."""
        items = self.present(key)
        if not isinstance(items, list):
            raise CacheFileError(f"{self.where}.{key} should be a list")
        return [Fields(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(items)]
