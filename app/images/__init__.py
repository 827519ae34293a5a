"""Image use-cases: the catalog, validation and the request path; framework-free."""
