"""Every outbound call to an image upstream lives in this package."""
