"""``python -m metacontrastive``: see ``metacontrastive.cli``."""
from metacontrastive.cli import main

if __name__ == "__main__":
    main()
