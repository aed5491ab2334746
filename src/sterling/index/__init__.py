"""Item index: the filter language, the exact attribute store and the searchable index."""
