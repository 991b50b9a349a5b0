"""What runs and sweeps write, as types: the manifest's keys (``manifest``), one trials-table row
(``outcome``), and the Arrow schemas and Parquet writers of the tables (``tables``).

Low in the package (it imports only io_utils and pyarrow) so that the search, the workers, the controls and the
analysis all read and write the same records without importing one another.
"""
