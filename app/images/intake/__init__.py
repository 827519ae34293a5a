"""What comes in with an edit before it is a job: files, on disk, checked from their headers.

- ``spool``: the multipart parser that spools each upload to disk while it arrives (bounded in
  size and count, never held in memory whole);
- ``inspector``: the image inspector, reading format, dimensions and alpha from the file headers
  without decoding a pixel;
- ``sweep``: the clean-up of spool and task-input folders left behind by a process that died.
"""
