"""Blob storage adapters (the `BlobStore` port): `local` keeps files under the data directory and
serves them through pigeon's own HTTP; `s3` hands clients pre-signed URLs of an S3 bucket."""
