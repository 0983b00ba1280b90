"""Record formats and validation, DataModules, collators, and the bundled demo task."""
