// Loads the committed OpenAPI document and points "Try it out" at the API gateway (Envoy).
//
// The document carries no host, so that one file serves every environment. This page is served
// from its own origin (make run: http://127.0.0.1:8081), so the gateway's address is set here, in
// memory, when the page loads, from the first of:
//   config/config.json under this page, {"api": "https://payments.example.com"}: what a
//     deployment mounts as the directory config/ (the Swagger UI image ships none; a missing file is not an error);
//   ?api=http://127.0.0.1:PORT in the page's URL: loopback origins only, so a link cannot send
//     the token a user pastes into "Authorize" to some other host;
//   the page's own host name on port 8080 (make run, docker compose).
// The gateway allows the page's origin in its CORS policy (PAYMENTS_CORS_ORIGINS).
(function () {
  "use strict";

  var DOCUMENT = "../payments.swagger.json";
  var CONFIG = "config/config.json";
  var DEFAULT_API_PORT = "8080";
  var LOOPBACK = /^https?:\/\/(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?$/;
  var ORIGIN = /^https?:\/\/[A-Za-z0-9.:\[\]-]+$/;

  function configuredOrigin() {
    return fetch(CONFIG, { cache: "no-cache" })
      .then(function (response) {
        return response.ok ? response.json() : {};
      })
      .then(function (config) {
        return typeof config.api === "string" && ORIGIN.test(config.api) ? new URL(config.api) : null;
      })
      .catch(function () {
        return null;
      });
  }

  function apiOrigin(configured) {
    if (configured) {
      return configured;
    }
    var asked = new URLSearchParams(window.location.search).get("api");
    if (asked && LOOPBACK.test(asked)) {
      return new URL(asked);
    }
    return new URL(window.location.protocol + "//" + window.location.hostname + ":" + DEFAULT_API_PORT);
  }

  function show(message) {
    document.getElementById("swagger-ui").textContent = message;
  }

  window.addEventListener("load", function () {
    var api;
    configuredOrigin()
      .then(function (configured) {
        api = apiOrigin(configured);
        return fetch(DOCUMENT, { cache: "no-cache" });
      })
      .then(function (response) {
        if (!response.ok) {
          throw new Error(DOCUMENT + ": HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (spec) {
        spec.host = api.host;
        spec.schemes = [api.protocol.replace(":", "")];
        window.ui = SwaggerUIBundle({
          spec: spec,
          dom_id: "#swagger-ui",
          deepLinking: true,
          displayOperationId: true,
          displayRequestDuration: true,
          defaultModelsExpandDepth: 1,
          // Offline-safe: no call to the public validator service; no configuration from the URL.
          validatorUrl: null,
          queryConfigEnabled: false,
          presets: [SwaggerUIBundle.presets.apis],
          layout: "BaseLayout",
        });
      })
      .catch(function (error) {
        show("Could not load the API document: " + error.message);
      });
  });
})();
