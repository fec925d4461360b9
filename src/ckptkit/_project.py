"""The one name shared by the hook markers, the plugin manager and the entry-point group."""

PROJECT_NAME = "ckptkit"
BACKENDS_ENTRY_POINT_GROUP = f"{PROJECT_NAME}.backends"
DISABLE_AUTOLOAD_ENV = "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD"
