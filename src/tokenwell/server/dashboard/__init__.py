"""The operator's dashboard (``/dashboard``) and the key holder's chat page (``/``)."""
