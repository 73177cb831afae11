# The project's commands. `make run` and `make test` work on a fresh machine: they set up
# everything they need (venv from requirements.lock, pinned Go tools, generated code, keys).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools/bin
# What `make run` needs (code generation, the README's grpcurl), and what only tests and benchmarks use.
RUN_TOOLS := $(TOOLS)/protoc-gen-openapiv2 $(TOOLS)/openapi3 $(TOOLS)/grpcurl
GO_TOOLS := $(RUN_TOOLS) $(TOOLS)/ghz $(TOOLS)/kustomize $(TOOLS)/composecheck $(TOOLS)/k8scheck $(TOOLS)/buf $(TOOLS)/oasdiff $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc
SWAGGER_UI := openapi/ui/node_modules/.package-lock.json
# The example clients the contract tests run (clients/, tests/e2e/test_clients.py).
CLIENTS := clients/go/.built clients/typescript/node_modules/.package-lock.json clients/python/.built
export PATH := $(CURDIR)/$(TOOLS):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-models gen bench images keys setup setup-run lock clean server

setup-run: $(VENV)/.installed $(RUN_TOOLS) gen/.stamp $(SWAGGER_UI)
setup: setup-run $(GO_TOOLS) $(CLIENTS)

# The benchmark's FastAPI peer (bench/versus.py), in a virtualenv of its own: none of it is the server's.
PEER_VENV := .venv-peer
$(PEER_VENV)/.installed: bench/peer/requirements.lock
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/peer/requirements.lock
	touch $@

$(VENV)/.installed: requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

# Each tool at the version tools/go.mod pins (its tool directives; go.sum checks them): go install
# inside that module, without @version, builds the module's own requirement.
PKG_protoc-gen-openapiv2 := github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-openapiv2
PKG_grpcurl := github.com/fullstorydev/grpcurl/cmd/grpcurl
PKG_ghz := github.com/bojand/ghz/cmd/ghz
PKG_kustomize := sigs.k8s.io/kustomize/kustomize/v5
PKG_composecheck := payments/tools/composecheck
PKG_k8scheck := payments/tools/k8scheck
PKG_openapi3 := payments/tools/openapi3
PKG_buf := github.com/bufbuild/buf/cmd/buf
PKG_oasdiff := github.com/oasdiff/oasdiff
PKG_protoc-gen-go := google.golang.org/protobuf/cmd/protoc-gen-go
PKG_protoc-gen-go-grpc := google.golang.org/grpc/cmd/protoc-gen-go-grpc
$(GO_TOOLS): $(TOOLS)/%: tools/go.mod tools/go.sum tools/composecheck/main.go tools/k8scheck/main.go tools/openapi3/main.go
	@echo "building $* into $(TOOLS) (pinned by tools/go.mod; a first build takes a while)"
	cd tools && GOBIN=$(CURDIR)/$(TOOLS) go install $(PKG_$*)
	touch $@

# Swagger UI's own distribution (npm swagger-ui-dist, pinned by openapi/ui/package-lock.json);
# --ignore-scripts: its analytics dependency's install script is never run.
$(SWAGGER_UI): openapi/ui/package.json openapi/ui/package-lock.json
	cd openapi/ui && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

# The Go client's modules (clients/go/go.sum), built once with stubs generated into the git-ignored
# clients/go/paymentsv1, so the tests' `go run` finds every dependency compiled in Go's build cache.
clients/go/.built: clients/go/go.mod clients/go/go.sum clients/go/main.go clients/go/gen.sh $(shell find proto -name "*.proto") $(VENV)/.installed $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc
	clients/go/gen.sh
	cd clients/go && go build -o /dev/null .
	touch $@

# The Python client's stubs, generated into the git-ignored clients/python/payments_client/_gen (its
# tests generate their own copy in a temporary directory; tests/support/python_client.py).
clients/python/.built: clients/python/gen.sh $(shell find proto -name "*.proto") $(VENV)/.installed
	clients/python/gen.sh
	touch $@

# The TypeScript client's generator and runtime (npm, pinned by clients/typescript/package-lock.json).
clients/typescript/node_modules/.package-lock.json: clients/typescript/package.json clients/typescript/package-lock.json
	cd clients/typescript && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

gen/.stamp: $(VENV)/.installed $(TOOLS)/protoc-gen-openapiv2 $(TOOLS)/openapi3 $(shell find proto -name '*.proto') scripts/gen.sh envoy/envoy.yaml scripts/envoy_variants.py
	scripts/gen.sh
	touch $@

# All generated code: Python stubs, Envoy's descriptor set, the OpenAPI documents (2.0 and 3.0), the Envoy variants.
gen: $(VENV)/.installed $(TOOLS)/protoc-gen-openapiv2 $(TOOLS)/openapi3
	scripts/gen.sh
	touch gen/.stamp

# A dev signing key pair in keys/ (git-ignored), made once.
keys: $(VENV)/.installed
	$(PY) -m server.cli keys --if-missing

# The whole stack in the foreground (Ctrl-C stops it): server on 127.0.0.1:50051, Envoy (REST and
# gRPC) on 127.0.0.1:8080, Swagger UI on 127.0.0.1:8081; SQLite in data/. devstack (python -m devstack)
# makes the dev key pair if it is missing and prints the URLs.
run: setup-run
	$(PY) -m devstack

# Every test; PostgreSQL is started (scripts/pg-test-db.sh) so the storage and service suites run on it too.
test: setup
	scripts/system-deps.sh test
	PAYMENTS_TEST_DATABASE_URL=$$(scripts/pg-test-db.sh) $(PY) -m pytest $(PYTEST_ARGS)

# The model-based tests at length (not part of `make test`, which runs a hundred-odd examples of
# each): PAYMENTS_MODEL_EXAMPLES and friends, tests/README.md.
test-models: setup
	PAYMENTS_TEST_DATABASE_URL=$$(scripts/pg-test-db.sh) PAYMENTS_MODEL_EXAMPLES=1000 PAYMENTS_MODEL_STEPS=50 \
		PAYMENTS_SESSION_MODEL_EXAMPLES=1500 PAYMENTS_SESSION_MODEL_STEPS=50 \
		PAYMENTS_CLIENT_MODEL_EXAMPLES=1000 PAYMENTS_CLIENT_MODEL_STEPS=50 \
		$(PY) -m pytest --timeout 0 tests/unit/test_payments_model.py tests/unit/test_sessions_model.py tests/unit/test_webhooks_model.py \
		tests/unit/test_clients_model.py

# Benchmarks (not part of `make test`): ghz for gRPC, wrk (Debian package) for REST, a few minutes;
# then the images' size, start-to-ready time and idle memory (bench/images.py).
# BENCH_ARGS="--postgres" adds the PostgreSQL cases; see bench/run.py --help.
bench: setup $(PEER_VENV)/.installed
	scripts/system-deps.sh bench
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/webhooks.py
	$(PY) bench/webhooks.py --events 400 --receiver-delay 0.05
	PAYMENTS_TEST_DATABASE_URL=$$(scripts/pg-test-db.sh) $(PY) bench/webhooks.py --processes 1,2,4 --receiver-delay 0.1 --events 1200
	scripts/system-deps.sh images
	$(PY) bench/images.py

# The three images from the Dockerfiles (docker where it runs, podman otherwise), tagged
# payments-{server,envoy,swagger-ui}:local; scripts/images.sh says what it does on each engine.
images:
	scripts/system-deps.sh images
	scripts/images.sh

# Re-pin Python dependencies from requirements.in; --allow-unsafe pins setuptools too (grpcio-tools
# needs it, and the image's code-generation stage installs it under these constraints).
lock:
	$(PY) -m pip install --quiet pip-tools==7.6.2 && $(VENV)/bin/pip-compile -q --strip-extras --no-header --no-emit-find-links --allow-unsafe -o requirements.lock requirements.in
	cd bench/peer && ../../$(VENV)/bin/pip-compile -q --strip-extras --no-header --no-emit-find-links --allow-unsafe -o requirements.lock requirements.in

clean:
	rm -rf $(VENV) $(PEER_VENV) .tools gen data .pytest_cache openapi/ui/node_modules \
		clients/go/.built clients/go/paymentsv1 clients/typescript/node_modules clients/typescript/gen clients/typescript/dist
