from fedpeft.cli import app

app(prog_name="fedpeft")
