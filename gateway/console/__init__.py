"""The web console: a face for people in a browser. Page shells (no data) and static assets
load without a key; every piece of data comes from fragment routes that call the service
behind the same key check as every other route."""
