"""``python -m modelscope_plugin.demo``, kept for scripts written against earlier releases; the demo lives in
``modelscope_plugin.apps.demo``."""
from modelscope_plugin.apps.demo import main

if __name__ == "__main__":
    main()
