"""Federated training across hospitals: one algorithm interface, an in-process engine,
strategies, secure aggregation, differential privacy, site governance and a Flower
adapter. Patient-level data never leave a site: a site's ``local_update`` returns
only population-level arrays, and the server sees only their sum.
"""
